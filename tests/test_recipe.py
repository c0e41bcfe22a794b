"""Recipes: every shipped recipe loads and round-trips; precedence; one test per error class."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cpmctl.errors import CpmError
from cpmctl.models import config as model_config
from cpmctl.quickstart import QUICKSTART_VOCAB
from cpmctl.recipe import (
    DataConfig,
    Recipe,
    TrainConfig,
    dump_recipe,
    field_help,
    load_recipe,
    recipe_digest,
    recipe_fields,
    recipe_from_dict,
    span_corruption_lengths,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SHIPPED = sorted(RECIPES.glob("*.toml"))
TINY = ("tiny-gpt", "tiny-encdec", "tiny-moe")


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(CpmError) as caught:
        load_recipe(path, overrides)
    message = str(caught.value)
    assert "\n" not in message  # the CLI prints it as one line
    return message


# ---------------------------------------------------------------- the shipped recipes


def test_every_recipe_the_architecture_names_is_shipped():
    names = {p.stem for p in SHIPPED}
    assert names == {"cpm1-small", "cpm1-medium", "cpm1-large", "cpm2", "cpm2-moe", *TINY}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_loads_and_is_complete(path):
    recipe = load_recipe(path)
    assert recipe.run.name == path.stem
    text = path.read_text(encoding="utf-8")
    sections = {name.split(".")[0] for name in re.findall(r"^\[([a-z_.]+)\]", text, re.M)}
    assert sections == {f.name for f in dataclasses.fields(Recipe)}, "every section written"
    assert text.startswith("# "), "a recipe opens with a comment that says what it is"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_round_trips_through_dump(path, tmp_path):
    recipe = load_recipe(path)
    text = dump_recipe(recipe)
    again = load_recipe(write(tmp_path, text))
    assert again == recipe
    assert dump_recipe(again) == text
    assert recipe_digest(again) == recipe_digest(recipe)
    assert load_recipe(write(tmp_path, dump_recipe(recipe, comments=True), "c.toml")) == recipe


# The published sizes (docs/design.md §5): (arch, n_layers, decoder layers, d_model, n_heads,
# head size, FFN size, vocab, experts).
SIZES = {
    "cpm1-small": ("gpt", 12, 12, 768, 12, 64, 3072, 30000, 0),
    "cpm1-medium": ("gpt", 24, 24, 1024, 16, 64, 4096, 30000, 0),
    "cpm1-large": ("gpt", 32, 32, 2560, 32, 80, 10240, 30000, 0),
    "cpm2": ("encdec", 24, 24, 4096, 64, 64, 10240, 26240, 0),
    "cpm2-moe": ("encdec", 24, 24, 4096, 64, 64, 10240, 26240, 32),
}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_big_recipes_have_the_published_cpm_sizes(name):
    r = load_recipe(RECIPES / f"{name}.toml")
    m = r.model
    assert (m.arch, m.n_layers, m.decoder_layers, m.d_model, m.n_heads, m.head_size,
            m.ffn_size, m.vocab_size, m.moe.experts) == SIZES[name]
    if m.arch == "gpt":  # CPM-1: lr 1.5e-4, warmup then cosine, 1,024 tokens, batch 3,072
        assert (r.data.seq_len, r.train.lr, r.train.schedule) == (1024, 1.5e-4, "cosine")
        assert r.train.warmup > 0 and r.train.batch_samples(r.data.seq_len) == 3072
    else:  # CPM-2: encoder 512, decoder 256, span corruption 0.15 / 3, DeepSpeed ZeRO in bf16
        assert (r.data.seq_len, r.data.decoder_seq_len) == (512, 256)
        assert (r.data.noise_density, r.data.mean_span) == (0.15, 3.0)
        assert r.engine.name == "deepspeed" and r.engine.zero_stage in (2, 3)
        assert r.train.precision == "bf16"
    if m.moe.experts:
        assert m.moe.router == "base"
    assert r.data.dataset == "work/dataset"


@pytest.mark.parametrize("name", TINY)
def test_tiny_recipes_train_on_cpu_on_the_quickstart_output(name):
    r = load_recipe(RECIPES / f"{name}.toml")
    assert r.data.dataset == "quickstart/dataset"
    assert r.run.output_dir == Path("quickstart/runs") / name
    assert r.model.vocab_size == QUICKSTART_VOCAB
    assert (r.model.n_layers, r.model.d_model, r.model.n_heads) == (2, 64, 4)
    assert (r.train.precision, r.engine.name, r.engine.zero_stage) == ("fp32", "torch", 0)
    assert r.data.seq_len == 128
    assert r.model.moe.experts == (4 if name == "tiny-moe" else 0)


# ---------------------------------------------------------------- precedence


def test_command_line_beats_file_beats_defaults(tmp_path):
    path = write(tmp_path, "[train]\nlr = 1e-3\nsteps = 50\n\n[model.moe]\nexperts = 2\n")
    from_file = load_recipe(path)
    assert from_file.train.lr == 1e-3 and from_file.train.steps == 50  # file
    assert from_file.train.beta1 == TrainConfig().beta1  # default
    assert from_file.model.moe.experts == 2

    r = load_recipe(path, ["train.lr=3e-4", "model.moe.experts=4", "train.beta2=0.95"])
    assert r.train.lr == 3e-4  # --set over the file
    assert r.model.moe.experts == 4  # nested section
    assert r.train.beta2 == 0.95  # --set over a default
    assert r.train.steps == 50  # the rest of the file stays
    assert load_recipe(path, ["train.lr=1", "train.lr=2"]).train.lr == 2.0  # the last one wins


def test_set_creates_a_section_the_file_does_not_have():
    r = load_recipe(RECIPES / "tiny-gpt.toml", ["model.moe.experts=4"])
    assert r.model.moe.experts == 4 and r.model.moe.router == "base"
    assert load_recipe(RECIPES / "tiny-gpt.toml").model.moe.experts == 0


@pytest.mark.parametrize("override, key, value", [
    ("train.lr=3e-4", "train.lr", 3e-4),
    ("train.lr=1", "train.lr", 1.0),  # an integer where a number goes
    ("run.name=x", "run.name", "x"),  # not TOML: the text itself
    ("run.name=2024", "run.name", "2024"),  # a string field keeps the text
    ('run.name="quoted"', "run.name", "quoted"),
    ("engine.compile=true", "engine.compile", True),
    ("init.model=", "init.model", ""),
    ("data.dataset=some/where", "data.dataset", "some/where"),
    (" train.steps = 700 ", "train.steps", 700),
])
def test_set_values_are_toml_or_text(override, key, value):
    r = load_recipe(RECIPES / "tiny-gpt.toml", [override])
    section, name = key.split(".")
    got = getattr(getattr(r, section), name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=3", ".lr=3"])
def test_a_malformed_set_is_an_error(override):
    message = error_of(RECIPES / "tiny-gpt.toml", [override])
    assert message.startswith(f"--set {override}: expected section.key=value")


def test_defaults_alone_make_a_valid_recipe():
    assert recipe_from_dict({}) == Recipe()


# ---------------------------------------------------------------- errors


def test_a_missing_file_says_no_such_recipe(tmp_path):
    assert error_of(tmp_path / "x.toml") == f"{tmp_path / 'x.toml'}: no such recipe"
    assert error_of(RECIPES / "tiny-gtp.toml") == (
        f"{RECIPES / 'tiny-gtp.toml'}: no such recipe (did you mean {RECIPES / 'tiny-gpt.toml'}?)")
    assert error_of(Path("recipes/nope.toml")) == "recipes/nope.toml: no such recipe"


def test_a_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 10\nlr = \n")
    assert re.fullmatch(rf"{re.escape(str(path))}: line 3: .+", error_of(path))
    path = write(tmp_path, "[run]\nname = [1,\n")  # unterminated at the end of the file
    assert error_of(path).startswith(f"{path}: line 2: ")


@pytest.mark.parametrize("text, expected", [
    ("[train]\nlrr = 1\n", "unknown key train.lrr (did you mean train.lr?)"),
    ("[trian]\nlr = 1\n", "unknown section [trian] (did you mean [train]?)"),
    ("[model.moe]\nexpert = 3\n", "unknown key model.moe.expert (did you mean model.moe.experts?)"),
    ("[model]\nd_modle = 3\n", "unknown key model.d_modle (did you mean model.d_model?)"),
    ("lr = 3e-4\n", "unknown key lr (did you mean train.lr?)"),
    ("[engine]\nzzz = 1\n", "unknown key engine.zzz"),
])
def test_unknown_keys_are_named_with_a_suggestion(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: {expected}"


@pytest.mark.parametrize("text, expected", [
    ("[train]\nsteps = 'ten'\n", "train.steps must be an integer, not 'ten'"),
    ("[train]\nsteps = true\n", "train.steps must be an integer, not true"),  # bool is no int
    ("[train]\nsteps = 1.5\n", "train.steps must be an integer, not 1.5"),
    ("[train]\nlr = 'fast'\n", "train.lr must be a number, not 'fast'"),
    ("[engine]\ncompile = 'yes'\n", "engine.compile must be true or false, not 'yes'"),
    ("[engine]\ncompile = 1\n", "engine.compile must be true or false, not 1"),
    ("[run]\nname = 5\n", "run.name must be a string, not 5"),
    ("[train]\nlr = [1]\n", "train.lr must be a number, not an array [1]"),
    ("train = 3\n", "train must be a table ([train]), not 3"),
    ("[model]\nmoe = 3\n", "model.moe must be a table ([model.moe]), not 3"),
    ("[train.lr]\nx = 1\n", "train.lr must be a number, not a table"),
])
def test_wrong_types_name_key_and_value(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: {expected}"


def test_an_integer_is_accepted_for_a_number(tmp_path):
    r = load_recipe(write(tmp_path, "[train]\nlr = 1\n"))
    assert r.train.lr == 1.0 and isinstance(r.train.lr, float)


@pytest.mark.parametrize("text, key", [
    ("[train]\nschedule = 'cosin'\n", "train.schedule"),
    ("[train]\nprecision = 'fp8'\n", "train.precision"),
    ("[engine]\nname = 'megatron'\n", "engine.name"),
    ("[model]\narch = 'gtp'\n", "model.arch"),
    ("[model.moe]\nrouter = 'switch'\n", "model.moe.router"),
])
def test_enumerations_list_their_choices(tmp_path, text, key):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: {key} must be one of ")
    choices = {"train.schedule": ("cosine", "linear", "noam", "constant"),
               "train.precision": ("fp32", "bf16", "fp16"),
               "engine.name": ("torch", "deepspeed"),
               "model.arch": model_config.ARCHS, "model.moe.router": model_config.ROUTERS}[key]
    assert ", ".join(choices) in message


def test_a_near_miss_enumeration_gets_a_suggestion(tmp_path):
    path = write(tmp_path, "[train]\nschedule = 'cosin'\n")
    assert error_of(path).endswith("not 'cosin' (did you mean cosine?)")


ENCDEC = "[model]\narch = 'encdec'\n"


@pytest.mark.parametrize("text, keys", [
    ("[train]\nwarmup_steps = 10\nwarmup_ratio = 0.1\n",
     ("train.warmup_steps", "train.warmup_ratio")),
    ("[train]\nglobal_batch = 8\nglobal_batch_tokens = 8192\n",
     ("train.global_batch", "train.global_batch_tokens")),
    ("[train]\nglobal_batch = 10\nmicro_batch = 4\n", ("train.global_batch", "train.micro_batch")),
    ("[data]\nseq_len = 128\n[train]\nglobal_batch_tokens = 1000\n",
     ("train.global_batch_tokens", "data.seq_len")),
    ("[data]\nseq_len = 128\n[train]\nglobal_batch_tokens = 1280\nmicro_batch = 4\n",
     ("train.global_batch_tokens", "train.micro_batch")),
    ("[engine]\nname = 'torch'\nzero_stage = 2\n", ("engine.zero_stage", "engine.name")),
    ("[engine]\nname = 'deepspeed'\nzero_stage = 4\n", ("engine.zero_stage",)),
    ("[engine]\nname = 'deepspeed'\noffload_optimizer = true\n", ("engine.offload_optimizer",)),
    (ENCDEC + "[data]\nnoise_density = 0.0\n", ("data.noise_density",)),
    (ENCDEC + "[data]\nnoise_density = 1.0\n", ("data.noise_density",)),
    (ENCDEC + "[data]\nseq_len = 512\ndecoder_seq_len = 64\n", ("data.decoder_seq_len",)),
    ("[data]\nseq_len = 2048\n[model]\nmax_positions = 1024\n",
     ("data.seq_len", "model.max_positions")),
    ("[data]\ndecoder_seq_len = 64\n", ("data.decoder_seq_len",)),
    ("[model]\nn_decoder_layers = 2\n", ("model.n_decoder_layers",)),
    ("[model]\nd_model = 100\nn_heads = 12\n", ("model.d_model", "model.n_heads")),
    ("[train]\nschedule = 'noam'\n", ("train.schedule", "warmup")),
    ("[train]\nsteps = 10\nwarmup_steps = 20\n", ("train.warmup_steps", "train.steps")),
    ("[model.moe]\nexperts = 4\nrouter = 'base'\ntop_k = 2\n", ("model.moe.top_k",)),
    ("[model.moe]\nexperts = 2\nrouter = 'topk'\ntop_k = 3\n",
     ("model.moe.top_k", "model.moe.experts")),
    ("[train]\nsteps = 0\n", ("train.steps",)),
    ("[train]\nlr = 0.0\n", ("train.lr",)),
    ("[train]\nbeta2 = 1.0\n", ("train.beta2",)),
    ("[train]\nwarmup_ratio = 1.5\n", ("train.warmup_ratio",)),
    ("[model]\ndropout = 1.0\n", ("model.dropout",)),
    ("[inherit]\nalpha = 1.5\n", ("inherit.alpha",)),
    ("[inherit]\ntemperature = 0.0\n", ("inherit.temperature",)),
    ("[run]\nname = 'a/b'\n", ("run.name",)),
])
def test_contradictions_and_ranges_name_the_keys(tmp_path, text, keys):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: ")
    for key in keys:
        assert key in message


def test_fp16_with_the_torch_engine_loads_the_trainer_checks_devices(tmp_path):
    r = load_recipe(write(tmp_path, "[train]\nprecision = 'fp16'\n[engine]\nname = 'torch'\n"))
    assert (r.train.precision, r.engine.name) == ("fp16", "torch")


def test_set_errors_name_set_instead_of_the_file():
    tiny = RECIPES / "tiny-gpt.toml"
    assert error_of(tiny, ["train.lrr=1"]) == (
        "--set: unknown key train.lrr (did you mean train.lr?)")
    assert error_of(tiny, ["trian.lr=1"]) == (
        "--set: unknown section [trian] (did you mean [train]?)")
    assert error_of(tiny, ["lr=1"]) == "--set: unknown key lr (did you mean train.lr?)"
    assert error_of(tiny, ["model.moe.expert=4"]) == (
        "--set: unknown key model.moe.expert (did you mean model.moe.experts?)")
    assert error_of(tiny, ["train.steps=ten"]) == "--set: train.steps must be an integer, not 'ten'"
    assert error_of(tiny, ["train.schedule=cosin"]).startswith("--set: train.schedule must be")
    # a contradiction between the file (warmup_steps) and --set (warmup_ratio) names both
    message = error_of(tiny, ["train.warmup_ratio=0.1"])
    assert message.startswith(f"{tiny} and --set: train.warmup_steps and train.warmup_ratio")
    message = error_of(tiny, ["data.seq_len=256"])
    assert message == f"{tiny} and --set: data.seq_len 256 is longer than model.max_positions 128"
    assert error_of(tiny, ["data.seq_len=256", "model.max_positions=64"]).startswith("--set: ")


# ---------------------------------------------------------------- help, dump, digest


def test_field_help_is_the_attribute_docstring():
    assert field_help("train", "lr") == "Peak learning rate, reached at the end of warmup."
    source = Path(model_config.__file__).read_text(encoding="utf-8")
    written = re.search(r'\n    d_model: int = \d+\n    """(.*?)"""', source, re.S)[1]
    assert field_help("model", "d_model") == " ".join(written.split())
    router = field_help("model.moe", "router")
    assert "BASE" in router and "\n" not in router and "  " not in router  # one line
    assert field_help("model", "moe.experts") == field_help("model.moe", "experts")
    assert field_help("model", "moe") == model_config.MoeConfig.__doc__
    assert field_help("engine", "zero_stage").startswith("deepspeed: ZeRO stage 0-3")


def test_field_help_of_an_unknown_key_suggests_one():
    with pytest.raises(CpmError, match=r"unknown key train\.lrr \(did you mean train\.lr\?\)"):
        field_help("train", "lrr")


def test_every_field_has_a_default_and_help():
    keys = set()
    for key, kind, default, help_text in recipe_fields():
        assert help_text, f"{key} has no docstring"
        assert isinstance(default, {"int": int, "float": float, "str": str, "bool": bool}[kind])
        keys.add(key)
    assert {"run.seed", "train.lr", "model.moe.experts", "inherit.temperature"} <= keys
    for section in dataclasses.fields(Recipe):
        assert field_help(section.name)


def test_sections_are_plain_dataclasses_handed_out_alone():
    r = load_recipe(RECIPES / "tiny-moe.toml")
    assert type(r.model) is model_config.ModelConfig  # the model code's own config class
    assert type(r.model.moe) is model_config.MoeConfig
    for section in dataclasses.fields(Recipe):
        assert dataclasses.is_dataclass(getattr(r, section.name))
    assert dataclasses.replace(r.data, seq_len=64).seq_len == 64


def test_dump_escapes_strings_and_keeps_floats_exact(tmp_path):
    r = Recipe()
    r.data.dataset = 'we"ird\\path\n\ttab \x7f 中文 ▂'
    r.run.output = "C:\\runs\\x"
    r.train.lr = 0.1 + 0.2
    r.train.eps = 3e-17
    r.model.moe.experts = 2
    text = dump_recipe(r)
    assert "[model.moe]" in text and "experts = 2" in text
    assert load_recipe(write(tmp_path, text)) == r


def test_digest_follows_the_values_not_the_comments(tmp_path):
    r = load_recipe(RECIPES / "tiny-gpt.toml")
    digest = recipe_digest(r)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    commented = write(tmp_path, "# a comment\n" + dump_recipe(r, comments=True))
    assert recipe_digest(load_recipe(commented)) == digest
    changed = dataclasses.replace(r, train=dataclasses.replace(r.train, lr=2e-3))
    assert recipe_digest(changed) != digest
    assert recipe_digest(load_recipe(RECIPES / "tiny-gpt.toml", ["run.seed=7"])) != digest


# ---------------------------------------------------------------- derived values


def test_span_corruption_lengths_follow_t5():
    assert span_corruption_lengths(512, 0.15, 3.0) == (568, 114)  # T5's numbers for 512
    raw, decoder = DataConfig(seq_len=512, decoder_seq_len=256).span_lengths()
    assert (raw, decoder) == (568, 256)
    assert DataConfig(seq_len=128).span_lengths()[1] == span_corruption_lengths(128, .15, 3)[1]


def test_warmup_and_batch_resolve_from_either_setting():
    assert TrainConfig(steps=1000, warmup_ratio=0.05).warmup == 50
    assert TrainConfig(steps=1000, warmup_steps=7).warmup == 7
    assert TrainConfig(global_batch_tokens=8192, micro_batch=4).batch_samples(1024) == 8
    assert TrainConfig(global_batch=32, micro_batch=4).accumulation(128, world_size=2) == 4
    assert TrainConfig(micro_batch=4).batch_samples(128, world_size=3) == 12
    with pytest.raises(CpmError, match="not a multiple"):
        TrainConfig(global_batch=32, micro_batch=4).accumulation(128, world_size=3)


def _t5_scan(inputs_length: int, density: float, mean_span: float) -> tuple[int, int]:
    """T5's own procedure (one token at a time), to check the binary search against."""

    def lengths(tokens):
        noise = min(max(int(round(tokens * density)), 1), tokens - 1)
        spans = max(int(round(noise / mean_span)), 1)
        # as the objective corrupts: never more spans than non-noise tokens (where T5 would
        # make empty spans, at densities near 1)
        spans = min(spans, noise, tokens - noise)
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = inputs_length - 1
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    return tokens, lengths(tokens)[1]


@pytest.mark.parametrize("inputs_length", [3, 5, 17, 128, 512, 1000])
@pytest.mark.parametrize("density, mean_span", [(0.15, 3.0), (0.5, 1.0), (0.3, 8.0), (0.9, 2.5)])
def test_span_lengths_search_matches_t5s_scan(inputs_length, density, mean_span):
    expected = _t5_scan(inputs_length, density, mean_span)
    assert span_corruption_lengths(inputs_length, density, mean_span) == expected
