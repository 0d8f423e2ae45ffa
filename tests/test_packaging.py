"""Packaging: entry points come from entry_points.toml, the console script runs, imports stay cheap,
and the module graph flows one way (core -> kernels/integrations never the reverse)."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_installed_entry_points_equal_entry_points_toml() -> None:
    declared = tomllib.loads((REPO / "entry_points.toml").read_text())
    dist = importlib.metadata.distribution("awq-plugin")
    installed: dict[str, dict[str, str]] = {}
    for ep in dist.entry_points:
        installed.setdefault(ep.group, {})[ep.name] = ep.value
    assert installed == declared


def test_vllm_plugin_entry_point_is_named_awq() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.value.startswith("awq_plugin.")]
    assert [ep.name for ep in ours] == ["awq"]


def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "awq-plugin"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("default-model", "inspect"):
        assert command in out


def test_console_script_default_model_is_idempotent(default_model_dir: Path) -> None:
    exe = Path(sys.executable).parent / "awq-plugin"
    before = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    out = subprocess.run([str(exe), "default-model", str(default_model_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == before  # reused, not rewritten
    config = (default_model_dir / "config.json").read_text()
    assert '"LlamaForCausalLM"' in config and '"num_hidden_layers": 30' in config
    assert (default_model_dir / "chat_template.jinja").is_file()


HEAVY_OR_TOOLING = ("vllm", "transformers", "triton", "matplotlib", "httpx", "openai", "gguf", "gensim")


def test_import_is_cheap() -> None:
    """``import awq_plugin`` loads no framework, plotting, HTTP or data package, and no tooling."""
    code = (
        "import sys, awq_plugin; "
        f"watched = {HEAVY_OR_TOOLING!r} + ('awq_plugin.kernels', 'awq_plugin.tools', 'torch'); "
        "print(','.join(m for m in sys.modules if m.split('.')[0] in watched or "
        "any(m == w or m.startswith(w + '.') for w in watched)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "", f"importing awq_plugin pulled in: {out.stdout.strip()}"


# ---- the dependency direction -----------------------------------------------------------------
# Core stages in the order data flows through them. A core module may import its own stage and
# earlier ones, never a later one; base modules (rank 0) are shared by all. Shells come after.
STAGE_RANK = {
    "errors": 0,
    "config": 0,
    "fsutil": 0,
    "procmem": 0,
    "cpuinfo": 0,  # the CPU's feature flags (kernel paths, the search's matmul dtype)
    "numerics": 0,
    "models": 1,  # skeleton surgery: unfused MoE experts
    "calibration": 2,  # text -> token windows -> recorded activations and their statistics
    "templates": 3,  # which module feeds which linears
    "algorithm": 4,  # AWQ search / apply / clip on plain torch modules
    "format": 5,  # packing and the on-disk checkpoint
    # compiled code: the INT4 GEMMs, and the quantizer's fused clip-search steps (which the
    # algorithm calls); a leaf over the base modules (KERNELS_MAY_IMPORT), so it ranks just above them
    "kernels": 1,
    "runtime": 6,  # loading for inference: AwqLinear on the kernels
    "pipeline": 7,  # the streaming, resumable quantizer
    "evaluate": 7,
    "api": 8,  # the public Python surface
    "integrations": 9,  # vLLM and transformers hooks: shells over the core
    "tools": 10,  # benchmarks, soak, demo, synthetic models
    "cli": 11,  # the command line: a shell over api and tools
}
CORE_MAX_RANK = STAGE_RANK["api"]


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] in ("integrations", "kernels"):
        parts = ["awq_plugin", *parts]
    return ".".join(p for p in parts if p != "__init__")


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "awq_plugin" else "awq_plugin"


def _package_files() -> list[Path]:
    return sorted(
        p for folder in ("awq_plugin", "integrations", "kernels") for p in (REPO / folder).rglob("*.py")
    )


def test_every_package_module_has_a_stage() -> None:
    unknown = {
        _stage(_module_of(p))
        for p in _package_files()
        if _module_of(p) != "awq_plugin" and _stage(_module_of(p)) not in STAGE_RANK
    }
    assert not unknown, f"modules outside any stage (add them to STAGE_RANK): {sorted(unknown)}"


#: What kernels/ may import from the package. The issue's rule is "kernels import only the numeric
#: reference" (numerics: PACK_FACTOR, unpacking, the reference GEMM, the group-size rule). The one
#: addition is fsutil, a base module, for ``cache_base``: the CPU builds and the quantize-on-start
#: models share one cache root ($AWQ_PLUGIN_CACHE), so its location is defined once. Moving it into
#: kernels would make fsutil (rank 0) import a later stage and pull torch into ``import awq_plugin``.
#: cpuinfo (base) is the one reader of the CPU's flags, shared with the AWQ search's dtype choice.
KERNELS_MAY_IMPORT = frozenset({"numerics", "fsutil", "cpuinfo"})


def _offenders(here: str, imports: set[str]) -> list[str]:
    """The edges from module ``here`` that break the flow."""
    stage = _stage(here)
    rank = STAGE_RANK.get(stage, 0)
    found = []
    for target in sorted(imports):
        top = target.split(".")[0]
        if top == "vllm" and stage not in ("integrations", "tools"):
            found.append(f"{here} imports {target}")
        if top != "awq_plugin" or _stage(target) in ("awq_plugin", stage):
            continue
        other = _stage(target)
        other_rank = STAGE_RANK.get(other, 0)
        if stage == "kernels" and other not in KERNELS_MAY_IMPORT:
            found.append(f"{here} (kernels) imports {target}")
        elif rank <= CORE_MAX_RANK and other_rank > rank:
            found.append(f"{here} ({stage}) imports later stage {target}")
        elif stage == "integrations" and other in ("tools", "cli"):
            found.append(f"{here} imports {target}")
    return found


def test_imports_point_down_the_flow() -> None:
    """Core never imports a later stage, tooling, the CLI or vLLM; kernels import only numerics
    (and fsutil, see KERNELS_MAY_IMPORT); integrations never import tooling. The one upward edge,
    awq_plugin/__init__.py activating the transformers integration, goes through importlib on
    purpose and is not an import statement."""
    offenders = []
    for path in _package_files():
        here = _module_of(path)
        offenders += _offenders(here, _imports_of(path, here))
    assert not offenders, "\n".join(offenders)


def test_edge_check_catches_a_planted_violation(tmp_path: Path) -> None:
    """The rule above can fail: each planted file, placed in a stage, is flagged by ``_offenders``."""
    planted = {
        "awq_plugin.numerics.bad": "from awq_plugin.pipeline.quantize import quantize_checkpoint\nimport vllm\n",
        "awq_plugin.numerics.bad_root": "from awq_plugin import pipeline\n",
        "awq_plugin.numerics.bad_relative": "from ..pipeline import quantize\n",
        "awq_plugin.kernels.bad": "import awq_plugin.pipeline.cache\n",
        "awq_plugin.kernels.cpu.bad": "from ...runtime import modeling\n",
        "awq_plugin.integrations.bad": "from awq_plugin import tools\n",
    }
    for module, source in planted.items():
        path = tmp_path / f"{module}.py"
        path.write_text(source)
        assert _offenders(module, _imports_of(path, module)), f"{module} was not flagged:\n{source}"
    # ... and passes what the rule allows.
    allowed = tmp_path / "good.py"
    allowed.write_text(
        "from awq_plugin import __version__\nfrom . import pack\nfrom awq_plugin.fsutil import cache_base\n"
    )
    assert _offenders("awq_plugin.kernels.good", _imports_of(allowed, "awq_plugin.kernels.good")) == []


def _imports_of(path: Path, module: str) -> set[str]:
    """Absolute names of what ``path`` (the module ``module``) imports.

    ``from awq_plugin import X`` counts as importing ``awq_plugin.X`` when X is a stage (a name
    that is not, such as ``__version__``, stays the package root); relative imports are resolved
    against the module's package.
    """
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level <= len(package), f"{module}: relative import beyond the top package"
                base = ".".join(package[: len(package) - node.level + 1])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            found.add(origin)
            # ``from PKG import name`` may import the submodule PKG.name: count it for our own
            # packages (from the package root only where the name is a stage).
            for alias in node.names:
                if origin == "awq_plugin" and alias.name not in STAGE_RANK:
                    continue
                if (origin == "awq_plugin" or origin.startswith("awq_plugin.")) and alias.name != "*":
                    found.add(f"{origin}.{alias.name}")
    return found
