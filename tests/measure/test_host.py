"""compactor/measure/host.py: a probe that cannot read the host records "unknown" and logs
why, rather than leaving the figure out."""

from __future__ import annotations

import logging

from compactor.measure import host


def test_an_unreadable_cpuinfo_is_recorded_as_unknown(monkeypatch, caplog):
    def no_cpuinfo(*_args, **_kwargs):
        raise PermissionError("denied")

    monkeypatch.setattr(host, "open", no_cpuinfo, raising=False)
    monkeypatch.setattr(host.platform, "processor", lambda: "")
    monkeypatch.setattr(host.platform, "machine", lambda: "")
    with caplog.at_level(logging.DEBUG, logger="compactor.measure.host"):
        described = host.describe_host()
    assert described["isa"] == [host.UNKNOWN] and described["cpu"] == host.UNKNOWN
    assert host.isa_flags() == []  # what the int8 ISA detection reads: no flags known
    assert "cannot read /proc/cpuinfo: denied" in caplog.messages


def test_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Test CPU\nflags\t\t: fpu avx2 fma sse\n", encoding="utf-8")
    real_open = open
    monkeypatch.setattr(host, "open", lambda _p, **kw: real_open(info, **kw), raising=False)
    assert host.cpu_model() == "Test CPU"
    assert host.isa_flags() == ["avx2", "fma"]
    assert host.describe_host()["isa"] == ["avx2", "fma"]
