"""Cold start: `import diffuse` imports no heavy library, and `diffuse generate` imports only what it uses.

Checked on sys.modules in a fresh interpreter (a value, not a time); the modules listed are the
optional or command-specific ones each path must leave alone.
"""

import json
import subprocess
import sys

from conftest import CAPTIONS

# the public API is imported on first use (diffuse/__init__.py), so `import diffuse` loads none of these
HEAVY = ["torch", "numpy", "PIL", "safetensors", "tqdm"]
# generate (a small image, no --sign) uses none of these: other commands, optional extras, chart drawing
NOT_FOR_GENERATE = [
    "fastapi", "uvicorn", "pydantic", "starlette", "sklearn", "scipy", "skimage", "matplotlib", "transformers",
    "imwatermark", "cv2", "pywt", "c2pa", "cryptography", "PIL.ImageDraw", "PIL.ImageFont",
    "diffuse.train", "diffuse.data", "diffuse.edit", "diffuse.evaluate", "diffuse.fid", "diffuse.server",
    "diffuse.shapes", "diffuse.adherence", "diffuse.replay",
]

CHILD = """
import json, sys
import diffuse
after_import = sorted(sys.modules)
assert diffuse.Pipeline.__module__ == "diffuse.pipeline"  # the lazy attribute resolves
from diffuse.cli import main
code = main(sys.argv[1:])
print(json.dumps({"import": after_import, "generate": sorted(sys.modules), "code": code}))
"""


def test_import_and_generate_leave_heavy_optional_modules_alone(tiny_text_model, tmp_path):
    folder = tiny_text_model({"cfg": 2.0, "steps": 2})
    r = subprocess.run([sys.executable, "-c", CHILD, "generate", CAPTIONS[0], "--model", str(folder), "--out", str(tmp_path),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.splitlines()[-1])
    assert seen["code"] == 0 and (tmp_path / "a-red-circle-above-a-blue-square-s0.png").is_file()
    assert [m for m in HEAVY if m in seen["import"]] == []
    assert [m for m in NOT_FOR_GENERATE if m in seen["generate"]] == []
    assert "torch" in seen["generate"]  # the check sees the generate path's imports
