"""A minimal ROS 2 lifecycle node that follows jetfleet's consumer contract (integration.md).

    ros2 run <your_pkg> ros2_lifecycle_consumer --ros-args \
        -p model_dir:=/models/detector -p ack_file:=/jetfleet/ack/detector.json

configure: resolve `current` once, deserialize `<version dir>/engine` with TensorRT, write
the acknowledgement (loaded, or failed with the reason); cleanup: release the engine.
The agent's activation hook reloads it through its transitions:

    n=/jetfleet_consumer
    ros2 lifecycle set $n deactivate; ros2 lifecycle set $n cleanup
    ros2 lifecycle set $n configure && ros2 lifecycle set $n activate

It needs rclpy and tensorrt (an Isaac ROS or L4T TensorRT image); it imports nothing of
jetfleet. Put your inference in on_activate (subscriptions) and drop it in on_deactivate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import rclpy
import tensorrt as trt
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn


def write_ack(path: Path, model: str, version: str, healthy: bool, reason: str) -> None:
    """Through a rename: the agent never reads half a file."""
    doc = {"model": model, "version": version, "healthy": healthy, "reason": reason[:300]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


class JetfleetConsumer(LifecycleNode):
    def __init__(self) -> None:
        super().__init__("jetfleet_consumer")
        self.declare_parameter("model_dir", "/models/detector")
        self.declare_parameter("ack_file", "/jetfleet/ack/detector.json")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine: trt.ICudaEngine | None = None

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        model_dir = Path(self.get_parameter("model_dir").value)
        ack = Path(self.get_parameter("ack_file").value)
        version_dir = (model_dir / "current").resolve()  # once: engine and version agree
        version = (version_dir / "version").read_text().strip()
        engine = self.runtime.deserialize_cuda_engine((version_dir / "engine").read_bytes())
        if engine is None:  # e.g. "Version tag does not match": built by another TensorRT
            write_ack(ack, model_dir.name, version, False, "engine does not deserialize")
            return TransitionCallbackReturn.FAILURE
        self.engine = engine
        write_ack(ack, model_dir.name, version, True, "loaded")
        self.get_logger().info(f"loaded {model_dir.name} {version}")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.engine = None
        return TransitionCallbackReturn.SUCCESS


def main() -> None:
    rclpy.init()
    rclpy.spin(JetfleetConsumer())


if __name__ == "__main__":
    main()
