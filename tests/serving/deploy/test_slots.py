"""serving.deploy.slots: the model-server command of the local target's slots. Its servers
write the payload log where the pipeline's quality check reads it
(PIPELINE_QUALITY_PAYLOAD_PATH), at the deploy setting's share, and not at all at 0%."""

from __future__ import annotations

from serving.deploy.settings import DeploySettings
from serving.deploy.slots import Slots


def test_the_local_servers_log_payloads_where_the_pipeline_reads_them(monkeypatch, tmp_path):
    from serving.server.__main__ import build_parser

    monkeypatch.setenv("PIPELINE_QUALITY_PAYLOAD_PATH", str(tmp_path / "payload-log"))

    def parsed(sample: float):
        settings = DeploySettings(payload_log_sample_percent=sample)
        cmd = Slots(settings, tmp_path, "http://mlflow").command("models:/m/1", 5011)
        return build_parser().parse_args(cmd[cmd.index("serving.server") + 1 :])

    args = parsed(25)
    assert args.payload_log_path == str(tmp_path / "payload-log")
    assert args.payload_log_sample_percent == 25
    monkeypatch.delenv("SERVING_PAYLOAD_LOG_PATH", raising=False)
    assert parsed(0).payload_log_path is None
