"""`diffuse eval fid`: folders and models scored against a reference folder with the real Inception network."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import needs_inception


pytestmark = needs_inception


def _folder(path, images):
    path.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:03d}.png")
    return path


def _eval(*args, env):
    return subprocess.run([sys.executable, "-m", "diffuse", "eval", "fid", *args], capture_output=True, text=True, env=env)


def test_fid_of_folders_against_a_reference_folder(tmp_path):
    import os

    from diffuse import shapes

    env = {**os.environ, "DIFFUSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    real = [shapes.render(shapes.sample(i).scene, 32) for i in range(12)]
    rng = np.random.default_rng(0)
    noisy = [np.clip(im + rng.normal(0, 40, im.shape), 0, 255).astype(np.uint8) for im in real]
    ref = _folder(tmp_path / "ref", real)
    same = _eval("--images", str(ref), "--ref", f"folder:{ref}", "--n-boot", "20", "--json", str(tmp_path / "same.json"), env=env)
    assert same.returncode == 0, same.stderr
    report = json.loads((tmp_path / "same.json").read_text())
    assert abs(report["fid"]) < 1e-3 and report["precision"] == 1.0 and report["recall"] == 1.0
    assert len(list((tmp_path / "cache" / "fid").glob("*.safetensors"))) == 1
    worse = _eval("--images", str(_folder(tmp_path / "noisy", noisy)), "--ref", f"folder:{ref}", "--n-boot", "20",
                  "--json", str(tmp_path / "noisy.json"), env=env)
    assert worse.returncode == 0, worse.stderr
    assert json.loads((tmp_path / "noisy.json").read_text())["fid"] > 50
    assert len(list((tmp_path / "cache" / "fid").glob("*.safetensors"))) == 1  # the reference statistics were reused


def test_bad_fid_arguments_are_one_line_errors(tmp_path):
    import os

    env = {**os.environ, "DIFFUSE_CACHE": str(tmp_path / "cache")}
    r = _eval("--ref", "digits", env=env)
    assert r.returncode == 2 and "give --model M" in r.stderr
    (tmp_path / "empty").mkdir()
    r = _eval("--images", str(tmp_path / "empty"), "--ref", "digits", env=env)
    assert r.returncode == 2 and "no images" in r.stderr and "Traceback" not in r.stderr
