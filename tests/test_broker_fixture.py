import subprocess

from controller.sandbox.localbroker import LocalMosquitto


def test_mosquitto_fixture_delivers_a_retained_message_and_survives_restart(
    mosquitto: LocalMosquitto,
) -> None:
    pub = ["mosquitto_pub", "-h", mosquitto.host, "-p", str(mosquitto.port)]
    subprocess.run([*pub, "-t", "t/x", "-m", "hello", "-r", "-q", "1"], check=True)
    mosquitto.stop()
    mosquitto.start()
    out = subprocess.run(
        ["mosquitto_sub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-t", "t/x", "-C", "1",
         "-W", "5"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert out.stdout.strip() == "hello"
