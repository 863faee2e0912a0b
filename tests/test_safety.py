"""Safety: the prompt block list (default and custom files) in the Pipeline and CLI, and the output classifier hook."""

import subprocess
import sys

import pytest

from diffuse.config import ModelConfig, _unet
from diffuse.pipeline import Pipeline, SampleSettings
from diffuse.safety import PromptFilter, Refused
from diffuse.text import WordTokenizer

CAPTIONS = ["a red circle above a blue square", "a green triangle"]

BLOCKED = [
    ("a nude figure", "word: nude, the default block list line"),
    ("NAKED man on a beach", "word: naked"),
    ("a very sexy pose", "'sexual' (regex:"),
    ("sexual content", "'sexual' (regex:"),
    ("gore everywhere!", "word: gore"),
    ("a ｇｏｒｅ scene", "word: gore"),  # full-width letters, NFKC-normalized
    ("a schoolgirl, naked", "word: naked"),
    ("kids in lingerie", "'minors' (regex:"),
    ("lingerie on a child", "'minors (reversed)' (regex:"),
    ("a bloody   massacre at dawn", "'graphic violence' (regex:"),
    ("the beheading of a statue", "word: beheading"),
]

BENIGN = [
    "a red circle above a blue square", "two yellow squares", "a portrait of an astronaut", "a cat on a sofa",
    "Scunthorpe United at home", "a gentle nudge", "a sussex landscape", "essex county map", "a gorey illustration",
"a bloody mary cocktail", "a child flying a kite", "teens playing football",
    "a kitchen knife on a cutting board", "the sextant of a ship", "sextuplets in a pram", "a red-blooded hero",
    "a minor chord on a piano", "the bathhouse of a Roman villa",
]
# not here: "Al Gore giving a speech" and "the moon seen with the naked eye" are blocked by the word rules "gore" and "naked"; a word list cannot tell senses apart


@pytest.fixture(scope="module")
def default_filter():
    return PromptFilter.default()


@pytest.mark.parametrize("prompt, rule", BLOCKED)
def test_default_list_blocks_and_names_the_rule(default_filter, prompt, rule):
    with pytest.raises(Refused, match="refused by block rule") as e:
        default_filter.check(prompt)
    assert rule in str(e.value) and "--blocklist FILE" in str(e.value)


def test_default_list_lets_benign_prompts_through(default_filter):
    assert [p for p in BENIGN if default_filter.match(p)] == []


def test_custom_list_format(tmp_path):
    path = tmp_path / "rules.txt"
    path.write_text("# my rules\n\nword: red circle\nregex: tri = \\btri\\w+\n  word:   Blue  \n", encoding="utf-8")
    f = PromptFilter.load(path)
    assert [(r.kind, r.name, r.where) for r in f.rules] == [
        ("word", "red circle", f"{path} line 3"), ("regex", "tri", f"{path} line 4"), ("word", "Blue", f"{path} line 5")]
    assert f.match("a RED\tcircle").name == "red circle"
    assert f.match("a redcircle") is None and f.match("a red circles") is None
    assert f.match("a green Triangle").name == "tri"
    assert f.match("BLUE!").name == "Blue" and f.match("blueberry") is None
    with pytest.raises(Refused, match=r"negative prompt was refused by block rule 'tri' \(regex: \\btri\\w\+\), "):
        f.check("triangles", "negative prompt")


@pytest.mark.parametrize("text, message", [
    ("nude", "line 1: 'nude' is not a rule; write 'word: TEXT' or 'regex: PATTERN'"),
    ("# ok\nphrase: nude", "line 2: unknown rule kind 'phrase'"),
    ("regex: (unclosed", "line 1: the regex '(unclosed' does not compile"),
    ("word:   ", "line 1: the word rule is empty"),
])
def test_bad_list_is_a_clear_error(text, message):
    with pytest.raises(ValueError, match="^rules.txt " + message.replace("(", r"\(").replace("'", "'")):
        PromptFilter.parse(text, "rules.txt")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, random_model):
    tok = WordTokenizer.from_captions(CAPTIONS + ["a gore circle"]).to_dict()
    cfg = ModelConfig(backbone_config=_unet("tiny", text_dim=32), conditioning="text", image_size=16,
                      text_config={"dim": 32, "depth": 1, "num_heads": 2, "tokenizer": tok})
    folder = tmp_path_factory.mktemp("m") / "tiny-text"
    random_model(cfg).save(folder)
    return folder


def test_pipeline_applies_the_filter_before_sampling(text_model):
    pipe = Pipeline.load(text_model)
    settings = SampleSettings(steps=2)
    with pytest.raises(Refused, match="the prompt was refused by block rule word: gore"):
        pipe("a gore circle", seeds=[0], settings=settings)
    with pytest.raises(Refused, match="the negative prompt was refused by block rule word: gore"):
        pipe(CAPTIONS[0], negative="a gore circle", seeds=[0], settings=settings)
    pipe.prompt_filter = PromptFilter.parse("word: green", "my list")
    with pytest.raises(Refused, match="word: green, my list line 1"):
        pipe.generate_batch([0, 1], prompts=[CAPTIONS[0], CAPTIONS[1]], settings=settings)
    assert len(pipe("a gore circle", seeds=[0], settings=settings)) == 1  # the default list is replaced
    pipe.prompt_filter = None
    assert len(pipe(CAPTIONS[1], seeds=[0], settings=settings)) == 1


def test_output_classifier_hook(text_model):
    pipe = Pipeline.load(text_model)
    seen = []

    def stand_in(image):
        """A stand-in classifier: objects to the third image it sees."""
        seen.append((image.size, image.mode))
        return "too bright" if len(seen) == 3 else None

    pipe.image_check = stand_in
    with pytest.raises(Refused, match="the image for seed 12 was withheld by the output classifier stand_in: too bright"):
        pipe(CAPTIONS[0], seeds=[10, 11, 12, 13], settings=SampleSettings(steps=2))
    assert seen == [((16, 16), "RGB")] * 3
    pipe.image_check = lambda image: None
    assert len(pipe(CAPTIONS[0], seeds=[10, 11], settings=SampleSettings(steps=2))) == 2


def _generate(*args):
    return subprocess.run([sys.executable, "-m", "diffuse", "generate", *args], capture_output=True, text=True)


def test_cli_refuses_with_one_line_and_takes_a_list(text_model, tmp_path):
    r = _generate("a gore circle", "--model", str(text_model), "--out", str(tmp_path), "--quiet", "--steps", "2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: the prompt was refused by block rule word: gore, the default block list line")
    rules = tmp_path / "rules.txt"
    rules.write_text("word: triangle\n", encoding="utf-8")
    r = _generate(CAPTIONS[1], "--model", str(text_model), "--out", str(tmp_path), "--quiet", "--blocklist", str(rules))
    assert r.returncode == 2 and f"word: triangle, {rules} line 1" in r.stderr
    r = _generate("a gore circle", "--model", str(text_model), "--out", str(tmp_path), "--quiet", "--steps", "2",
                  "--blocklist", "none")
    assert r.returncode == 0, r.stderr
    r = _generate(CAPTIONS[1], "--model", str(text_model), "--out", str(tmp_path), "--blocklist", str(tmp_path / "nope.txt"))
    assert r.returncode == 2 and "does not exist; give an existing file to --blocklist" in r.stderr
