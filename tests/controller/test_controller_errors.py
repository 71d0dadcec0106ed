"""One coded error on the controller side too: every error class a controller module
defines derives from protocol.errors.CodedError, with its own code and a reason."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import controller
from protocol.errors import CodedError


def _controller_errors() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(controller.__path__, "controller."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == info.name:
                found.append(cls)
    return found


def test_every_controller_error_is_a_coded_error_with_its_own_code() -> None:
    errors = _controller_errors()
    assert len(errors) >= 14
    uncoded = [f"{e.__module__}.{e.__qualname__}" for e in errors if not issubclass(e, CodedError)]
    assert uncoded == []
    codes = [e.code for e in errors if issubclass(e, CodedError)]
    assert "internal" not in codes
    assert len(codes) == len(set(codes))


def test_a_controller_error_keeps_the_builtin_kind_callers_catch() -> None:
    from controller.settings import SettingsError

    err = SettingsError("config key 'broker' is not a URL")
    assert isinstance(err, ValueError) and err.reason == str(err) and err.code == "settings"
