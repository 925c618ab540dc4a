"""Failures a run must stop on up front, with the file, key or value named (exit code 2), and damage it must
not silently resume from: real BLIP weights without BERT's vocabulary, damaged training state, two runs in one
output directory, an empty ``aurora:`` section, unreadable images, sizes LAVIS fails on mid-run, YAML syntax
errors, a missing ``lavis`` extra, and leftovers of interrupted writes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aurora_pet.cli import main as cli
from aurora_pet.families.lavis.build import BERT_VOCAB_SIZE, DEFAULT_VOCAB, bert_vocab_file, build_blip
from aurora_pet.training import DataError, RecipeError, ResumeError, dataset_options, load_recipe, train
from aurora_pet.training.run_state import output_lock

from .test_recipes import IMAGE_SIZE, RECIPES, retrieval_data, tiny_options

FLICKR = RECIPES / "retrieval_flickr30k.yaml"


def _options(written: dict, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(out, epochs=epochs) + list(extra)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli(argv)
    return code, capsys.readouterr().err


# -- 1. real BLIP weights need bert-base-uncased's vocabulary ---------------------------------------------

# BLIP-base's classes and its 30524-row embedding (BERT's ids), every other width shrunk: seconds on a CPU
NARROW_BASE = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 128,
               "vision_width": 64, "vision_depth": 1, "vision_heads": 4, "patch_size": 8, "embed_dim": 32,
               "queue_size": 16, "vit_grad_ckpt": False}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache."""
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("transformers.utils.hub.TRANSFORMERS_CACHE", str(tmp_path / "empty-hf-cache"))


def _bert_like_vocab(path: Path, size: int = BERT_VOCAB_SIZE) -> Path:
    """A vocab.txt laid out like bert-base-uncased's ([PAD] 0, [UNK] 100, ...) with the demo's words."""
    words = [w for w in DEFAULT_VOCAB.read_text().split() if not w.startswith("[")]
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokens += [f"[unused{i}]" for i in range(99, 99 + size - len(tokens))]
    path.write_text("\n".join(tokens) + "\n")
    return path


def _narrow_base_checkpoint(path: Path) -> Path:
    model = build_blip("blip_retrieval", "flickr", size="base", image_size=IMAGE_SIZE, **NARROW_BASE)
    torch.save({"model": model.state_dict()}, path)
    return path


def _narrow_base_options(checkpoint: Path) -> list[str]:
    return ["model.size=base", f"model.pretrained={checkpoint}",
            *(f"model.{key}={value}" for key, value in NARROW_BASE.items())]


def test_base_checkpoint_without_vocabulary_stops_with_how_to_provide_it(tmp_path, offline):
    written = retrieval_data(tmp_path / "data")
    checkpoint = _narrow_base_checkpoint(tmp_path / "blip.pth")
    options = _options(written, tmp_path / "run", *_narrow_base_options(checkpoint))
    with pytest.raises(RecipeError) as error:
        train(FLICKR, options)
    message = str(error.value)
    assert "bert-base-uncased" in message and "vocab.txt" in message and "model.vocab_file" in message
    assert "model.allow_download: true" in message and "huggingface-cli download bert-base-uncased vocab.txt" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bert_vocab_file_comes_from_the_argument_or_the_cache(tmp_path, offline, monkeypatch):
    own = _bert_like_vocab(tmp_path / "vocab.txt")
    assert bert_vocab_file(own) == own
    with pytest.raises(ValueError, match="not in the Hugging Face cache and downloads are not allowed"):
        bert_vocab_file()
    cache = tmp_path / "hf-cache"  # where LAVIS's BertTokenizer.from_pretrained leaves it
    snapshot = cache / "models--bert-base-uncased" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / "models--bert-base-uncased" / "refs").mkdir()
    (cache / "models--bert-base-uncased" / "refs" / "main").write_text("0123abcd")
    _bert_like_vocab(snapshot / "vocab.txt")
    monkeypatch.setattr("transformers.utils.hub.TRANSFORMERS_CACHE", str(cache))
    assert bert_vocab_file() == snapshot / "vocab.txt"

    asked = []
    monkeypatch.setattr("transformers.utils.cached_file", lambda *a, **k: asked.append(k) or str(own))
    assert bert_vocab_file(allow_download=True) == own and asked == [{"local_files_only": False}]


def test_vocabulary_without_bert_ids_is_refused(tmp_path, offline):
    written = retrieval_data(tmp_path / "data")
    checkpoint = _narrow_base_checkpoint(tmp_path / "blip.pth")
    short = _bert_like_vocab(tmp_path / "short_vocab.txt", size=30000)
    options = _options(written, tmp_path / "run", *_narrow_base_options(checkpoint), f"model.vocab_file={short}")
    with pytest.raises(RecipeError, match=re.escape(f"vocabulary {short} (30000 tokens) gives [DEC] id 30000 "
                                                    "and [ENC] id 30001, but the pretrained BLIP-base embedding "
                                                    "has them at 30522 and 30523")):
        train(FLICKR, options)


@pytest.mark.slow
def test_base_checkpoint_with_bert_vocabulary_trains(tmp_path, offline):
    written = retrieval_data(tmp_path / "data")
    checkpoint = _narrow_base_checkpoint(tmp_path / "blip.pth")
    vocab = _bert_like_vocab(tmp_path / "vocab.txt")
    result = train(FLICKR, _options(written, tmp_path / "run", *_narrow_base_options(checkpoint),
                                    f"model.vocab_file={vocab}"), quiet=True)
    tokenizer = result.model.base_model.tokenizer
    assert (tokenizer.bos_token_id, tokenizer.enc_token_id, len(tokenizer)) == (30522, 30523, 30524)
    assert tokenizer.convert_ids_to_tokens(tokenizer("a red circle")["input_ids"]) == ["[CLS]", "a", "red", "circle",
                                                                                        "[SEP]"]
    assert result.final["test_agg_metrics"] >= 0


# -- 4. checksums of the training state -----------------------------------------------------------------------

@pytest.fixture
def finished_run(tmp_path):
    written = retrieval_data(tmp_path / "data")
    out = tmp_path / "run"
    options = _options(written, out, "run.valid_splits=[val]")
    train(FLICKR, options, quiet=True)
    return out, options


@pytest.mark.slow
def test_damaged_training_state_is_named_not_resumed(finished_run):
    out, options = finished_run
    epoch = out / "checkpoints" / "epoch_0"
    checksums = json.loads((epoch / "checksums.json").read_text())
    assert {"training_state.pt", "evaluated_state.pt", "resume_state.safetensors",
            "adapter_model.safetensors"} <= set(checksums)
    state = epoch / "training_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, inside the stored tensors
    state.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match=re.escape(f"{state} is damaged: its SHA-256 is")):
        train(FLICKR, options + ["run.max_epoch=2"], resume=True)

    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    resume_state = epoch / "resume_state.safetensors"
    resume_state.write_bytes(resume_state.read_bytes()[:1000])  # truncated
    with pytest.raises(ResumeError, match=re.escape(f"{resume_state} is damaged")):
        train(FLICKR, options + ["run.max_epoch=2"], resume=True)


# -- 5. one run per output directory ------------------------------------------------------------------------

HOLD_LOCK = ("import sys, time\nfrom pathlib import Path\nfrom aurora_pet.training.run_state import output_lock\n"
             "with output_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture
def lock_holder(tmp_path):
    """Start a process that holds run.lock of a directory (as a running training does); yields a starter."""
    processes = []

    def start(directory: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE,
                                   text=True)
        processes.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


def test_second_run_in_one_output_directory_is_refused_until_the_first_ends(tmp_path, lock_holder):
    written = retrieval_data(tmp_path / "data")
    out = tmp_path / "run"
    holder = lock_holder(out)
    with pytest.raises(RecipeError) as error:
        train(FLICKR, _options(written, out))
    message = str(error.value)
    assert f"run.output_dir {out} is in use by another run (pid {holder.pid} on {socket.gethostname()}" in message
    assert not (out / "checkpoints").exists()

    holder.kill()  # a killed run leaves its name in run.lock; the kernel has dropped its lock
    holder.wait()
    assert str(holder.pid) in (out / "run.lock").read_text()
    broken = retrieval_data(tmp_path / "broken")
    Path(broken["images"], "flickr30k-images/100001.jpg").unlink()
    with pytest.raises(DataError):  # fails after taking the lock: the lock is released all the same
        train(FLICKR, _options(broken, out))
    assert (out / "run.lock").read_text() == ""
    with output_lock(out):
        assert f'"pid": {os.getpid()}' in (out / "run.lock").read_text()


@pytest.mark.slow
def test_torchrun_ranks_all_stop_when_the_output_directory_is_in_use(tmp_path, lock_holder):
    """Only rank 0 takes the lock; the others learn its outcome and stop too (none waits for it forever)."""
    written = retrieval_data(tmp_path / "data")
    out = tmp_path / "run"
    holder = lock_holder(out)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(RECIPES / "train.py"), "--cfg-path", str(FLICKR), "--options", *_options(written, out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count(f"is in use by another run (pid {holder.pid}") == 2, done.stderr[-3000:]


# -- 6. an empty aurora: section ------------------------------------------------------------------------------

@pytest.mark.parametrize("section", ["aurora:\n", "aurora: {}\n"])
def test_empty_aurora_section_is_refused(tmp_path, section):
    text = re.sub(r"\naurora:\n(  .*\n)+", "\n" + section, FLICKR.read_text())
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=re.escape(f"{path}: the aurora: section is empty")):
        load_recipe(path)


def test_aurora_null_option_is_refused():
    with pytest.raises(RecipeError, match=re.escape("--options: the aurora: section is empty")):
        load_recipe(FLICKR, ["aurora=null"])


# -- 10. images that cannot be read ----------------------------------------------------------------------------

def test_unreadable_images_are_all_named_before_anything_runs(tmp_path):
    written = retrieval_data(tmp_path / "data")
    images = Path(written["images"], "flickr30k-images")
    train_image, val_image, test_image, header_cut, padded = (images / f"{i}.jpg" for i in
                                                              (100000, 100008, 100012, 100013, 100009))
    val_image.write_bytes(b"")
    test_image.write_bytes(test_image.read_bytes()[:-200])  # truncated JPEG
    train_image.write_bytes(train_image.read_bytes()[:-200])
    header_cut.write_bytes(header_cut.read_bytes()[:100])
    padded.write_bytes(padded.read_bytes() + b"\0" * 64)  # data after the end marker: a readable JPEG
    out = tmp_path / "run"
    with pytest.raises(DataError) as error:
        train(FLICKR, _options(written, out))
    message = str(error.value)
    assert message.startswith("4 of 16 images cannot be read")
    assert f"{val_image}: empty file" in message
    for path in (train_image, test_image, header_cut):
        assert f"\n  {path}: " in message
    assert str(padded) not in message
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_failed_evaluation_keeps_the_trained_epoch_and_resume_evaluates_it(tmp_path, monkeypatch):
    from lavis.tasks.retrieval import RetrievalTask

    written = retrieval_data(tmp_path / "data")
    full, failed = tmp_path / "full", tmp_path / "failed"
    extra = ("run.valid_splits=[val]", "run.init_lr=1e-2")
    train(FLICKR, _options(written, full, *extra, epochs=2), quiet=True)

    def broken(self, model, data_loader, **kwargs):
        raise OSError("the evaluation failed")

    monkeypatch.setattr(RetrievalTask, "evaluation", broken)
    with pytest.raises(OSError, match="the evaluation failed"):
        train(FLICKR, _options(written, failed, *extra, epochs=2), quiet=True)
    epoch = failed / "checkpoints" / "epoch_0"
    assert json.loads((failed / "checkpoints" / "latest.json").read_text())["dir"] == "epoch_0"
    assert not (epoch / "evaluated_state.pt").exists()

    monkeypatch.undo()
    resumed = train(FLICKR, _options(written, failed, *extra, epochs=2), resume=True, quiet=True)
    assert resumed.resumed_from == epoch
    history = [json.loads((d / "metrics.json").read_text())["epochs"] for d in (full, failed)]
    assert history[0] == history[1] and [row["epoch"] for row in history[1]] == [0, 1]
    for name in ("epoch_1", "best"):
        a, b = (load_file(str(d / "checkpoints" / name / "adapter_model.safetensors")) for d in (full, failed))
        assert all(torch.equal(a[key], b[key]) for key in a), name


# -- 14. sizes and values LAVIS fails on mid-run -----------------------------------------------------------------

@pytest.mark.parametrize("option, message", [
    ("run.batch_size_train=0", "run.batch_size_train must be a positive integer, got 0"),
    ("run.max_epoch=0", "run.max_epoch must be a positive integer, got 0"),
    ("run.init_lr=-1e-4", "run.init_lr must be a number > 0, got -0.0001"),
    ("run.init_lr=nan", "run.init_lr must be a number > 0, got 'nan'"),
    ("run.min_lr=-1", "run.min_lr must be a number >= 0, got -1"),
    ("run.k_test=0", "run.k_test must be a positive integer, got 0"),
])
def test_bad_run_values_are_named(option, message):
    with pytest.raises(RecipeError, match=re.escape(f"{FLICKR}: {message}")):
        load_recipe(FLICKR, [option])


@pytest.mark.parametrize("sizes, option, message", [
    ({"n_train": 2}, "run.batch_size_train=16",
     "the training split has 10 entries ({ann}), fewer than one batch of run.batch_size_train=16 x 1 process(es)"),
    ({"n_train": 1}, "run.batch_size_train=4",
     "{ann}: the training split shows 1 image(s); BLIP's retrieval loss draws each caption's hard negative"),
    ({"n_val": 3}, "run.k_test=4", "run.k_test=4 is larger than the 3 image(s) or 15 caption(s) of the val split"),
    ({}, "model.queue_size=18", "model.queue_size=18 is not a multiple of the global batch size 4 "
                                "(run.batch_size_train=4 x 1 process(es)); use e.g. model.queue_size=16"),
])
def test_sizes_lavis_fails_on_mid_run_stop_the_command_line(tmp_path, capsys, sizes, option, message):
    written = retrieval_data(tmp_path / "data", **sizes)
    options = _options(written, tmp_path / "run", option)
    code, err = _cli(["train", "--cfg-path", str(FLICKR), "--options", *options], capsys)
    assert code == 2 and message.format(ann=written["annotations"]["train"][0]) in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(FLICKR.read_text().replace("  init_lr: 1e-4", "   init_lr: 1e-4"))
    line = path.read_text().splitlines().index("   init_lr: 1e-4") + 1
    code, err = _cli(["train", "--cfg-path", str(path)], capsys)
    assert code == 2 and f"{path}:{line}:" in err and "not valid YAML" in err, err
    path.write_bytes(FLICKR.read_bytes().replace(b"# Aurora", b"# \xffurora"))  # not UTF-8
    code, err = _cli(["train", "--cfg-path", str(path)], capsys)
    assert code == 2 and f"{path}: not a valid yaml file" in err, err


def test_non_utf8_adapter_config_is_named(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes(b'{"rank": 8, "note": "\xff\xfe"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    written = retrieval_data(tmp_path / "data")
    options = _options(written, tmp_path / "run", f"aurora.adapter={adapter}", "run.evaluate=True")
    code, err = _cli(["train", "--cfg-path", str(FLICKR), "--options", *options], capsys)
    assert code == 2 and f"{adapter / 'adapter_config.json'} is not UTF-8 text" in err, err


# -- 15. the command line without the lavis extra --------------------------------------------------------------

BLOCK_MODULES = """
import sys

class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Missing())
from {entry} import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("blocked, entry", [(("omegaconf",), "aurora_pet.cli"), (("lavis",), "aurora_pet.cli"),
                                            (("omegaconf", "lavis"), "aurora_pet.cli.train")])
def test_missing_lavis_extra_says_what_to_install(tmp_path, blocked, entry):
    argv = ["--cfg-path", str(FLICKR)]
    script = BLOCK_MODULES.format(blocked=set(blocked), entry=entry,
                                  argv=argv if entry.endswith("train") else ["train", *argv])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "aurora-pet train: error: it needs the lavis extra" in done.stderr
    assert f"the module {blocked[0]!r} is not installed: pip install 'aurora-pet[lavis]'" in done.stderr
    assert "Traceback" not in done.stderr


# -- 16. leftovers of interrupted writes ---------------------------------------------------------------------------

def _leave_temporaries(out: Path) -> list[Path]:
    leftovers = [out / ".metrics.json.tmp-k1ll3d", out / ".adapter.tmp-k1ll3d", out / "checkpoints" / ".epoch_0.tmp-x",
                 out / "checkpoints" / ".latest.json.tmp-y"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        if "epoch" in path.name or "adapter" in path.name:
            path.mkdir()
            (path / "adapter_model.safetensors").write_bytes(b"half")
        else:
            path.write_text("half")
    return leftovers


@pytest.mark.slow
def test_leftovers_of_interrupted_writes_are_removed_at_the_start(tmp_path):
    written = retrieval_data(tmp_path / "data")
    out = tmp_path / "run"
    leftovers = _leave_temporaries(out)  # killed before its first checkpoint
    options = _options(written, out, "run.valid_splits=[val]")
    train(FLICKR, options, quiet=True)
    assert not any(path.exists() for path in leftovers)

    inside = out / "checkpoints" / "epoch_0" / ".evaluated_state.pt.tmp-z"
    leftovers = _leave_temporaries(out) + [inside]
    inside.write_bytes(b"half")
    train(FLICKR, options + ["run.max_epoch=2"], resume=True, quiet=True)
    assert not any(path.exists() for path in leftovers)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "epoch_0", "epoch_1", "latest.json"]
