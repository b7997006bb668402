"""The shipped accelerate configs launch what their comments say."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_single_gpu_config_shows_one_gpu_and_gpu_ids_picks_it(tmp_path):
    """One process sees GPU 0 alone (trl's device_map auto would spread the model over every visible GPU);
    --gpu_ids picks another."""
    script = tmp_path / "show.py"
    script.write_text("import os\nprint(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))\n")
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    seen = []
    for extra in ([], ["--gpu_ids", "3"]):
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(REPO / "recipes/accelerate/single_gpu.yaml"), *extra, str(script)],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen.append(proc.stdout.strip().splitlines()[-1])
    assert seen == ["0", "3"]
