"""The CPU kernel's build cache survives a build that was killed half-way."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils import cpp_extension

from awq_plugin.fsutil import CACHE_ENV
from awq_plugin.kernels.cpu import build


def test_stale_torch_baton_does_not_block_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A build killed between torch creating its baton and removing it leaves the file behind;
    # torch's next load would then wait on it forever (a CI run once hung here for an hour).
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    build_dir = tmp_path / "kernels" / build.build_key(build.compile_flags())
    build_dir.mkdir(parents=True)
    (build_dir / build.TORCH_BATON).touch()

    seen: dict[str, object] = {}

    def fake_load(**kwargs: object) -> str:
        seen.update(kwargs)
        seen["baton_present"] = (build_dir / build.TORCH_BATON).exists()
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert build.load_extension.__wrapped__() == "module"
    assert seen["build_directory"] == str(build_dir)
    assert seen["baton_present"] is False
