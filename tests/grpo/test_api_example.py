"""docs/grpo.md's Python example runs as written, on the random tiny model and two steps."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "grpo.md"


def test_the_documented_example_trains(random_adder_dir, tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    code = code.replace("str(ensure_tiny_adder())", repr(str(random_adder_dir)))
    code = code.replace('output_dir="runs/adder"', f"output_dir={str(tmp_path)!r}")
    code = code.replace("max_steps=100", "max_steps=2").replace("per_device_train_batch_size=64",
                                                                 "per_device_train_batch_size=16")
    namespace = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    assert any("iif/kept_fraction" in entry for entry in trainer.state.log_history)
