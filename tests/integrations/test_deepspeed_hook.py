"""``import dist_optim`` teaches DeepSpeed's engine our optimizers whatever the import order, without
importing DeepSpeed itself, and a hook that fails warns instead of breaking the user's import.
Each case runs in a fresh interpreter, since imports are process-wide."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed", reason="pip install --no-build-isolation deepspeed")

PATCHED = "from deepspeed.runtime.engine import DeepSpeedEngine; print(getattr(DeepSpeedEngine, '_dist_optim_patched', False))"


def run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize(
    "imports",
    ["import dist_optim; import sys; assert 'deepspeed' not in sys.modules; import deepspeed",
     "import deepspeed; import dist_optim",
     "from dist_optim import AdamW; import deepspeed"],
)
def test_the_engine_is_patched_whatever_the_import_order(imports):
    out = run(f"{imports}\n{PATCHED}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_a_failing_hook_warns_and_the_module_still_imports(tmp_path):
    (tmp_path / "some_framework.py").write_text("VALUE = 1\n")
    out = run(f"""
        import sys, warnings
        sys.path.insert(0, {str(tmp_path)!r})
        from dist_optim.integrations._post_import import when_imported
        def broken(module):
            raise RuntimeError("no such method in this version")
        when_imported("some_framework", broken)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import some_framework
        print(some_framework.VALUE, any("could not hook into some_framework" in str(w.message) for w in caught))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1 True"
