"""evaluation/eval_template.py + evaluation/exp.py: the orchestrator end to end on the tiny checkpoint, resumed runs
that redo nothing, the configuration errors and the message of a fresh clone.

The end-to-end test runs the shapes suite (a 32 px world with 2 held-out pairs, 2 samples per prompt), the shapes
VQA through a real server subprocess and the local lm-eval task, with small subsets. Generation and scoring are
interrupted (KeyboardInterrupt from a counting wrapper, as a Ctrl-C would) and rerun; the counts of images drawn,
images scored and questions asked must add up to each item exactly once.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_process.shapes_world import build
from evaluation.benchmarks import REGISTRY, get_benchmark
from evaluation.exp import EXPERIMENTS, ExperimentError, parse_experiments
from tests.model_fixtures import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- configuration
def _exp(tmp_path: Path, **extra) -> dict:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text("{}")
    return {"name": "e1", "model_path": str(ckpt), "eval_type": ["text"], **extra}


def test_unknown_keys_name_the_experiment_and_the_key(tmp_path):
    with pytest.raises(ExperimentError, match=r"experiment 'e1': cfgg: unknown key"):
        parse_experiments([_exp(tmp_path, cfgg=2.0)], list(REGISTRY))
    with pytest.raises(ExperimentError, match=r"command line: --n_sample: unknown key"):
        parse_experiments([_exp(tmp_path)], list(REGISTRY), overrides={"n_sample": 2})
    with pytest.raises(ExperimentError, match=r"experiment 'e1': eval_type: unknown benchmark 'genevall'"):
        parse_experiments([_exp(tmp_path, eval_type=["genevall"])], list(REGISTRY))
    with pytest.raises(ExperimentError, match=r"experiment 'e1': t2i_sampling.topk: unknown sampling field"):
        parse_experiments([_exp(tmp_path, t2i_sampling={"topk": 5})], list(REGISTRY))
    with pytest.raises(ExperimentError, match=r"experiment 'nope': name: not in the list"):
        parse_experiments([_exp(tmp_path)], list(REGISTRY), only=["nope"])


def test_missing_paths_name_the_experiment_and_the_key(tmp_path):
    with pytest.raises(ExperimentError, match=r"experiment 'e1': geneval_prompts_path: .*needed by eval_type"):
        parse_experiments([_exp(tmp_path, eval_type=["geneval"])], list(REGISTRY))
    with pytest.raises(ExperimentError, match=r"experiment 'e1': geneval_prompts_path: file .*nowhere.jsonl does not"):
        parse_experiments([_exp(tmp_path, eval_type=["geneval"], geneval_prompts_path=str(tmp_path / "nowhere.jsonl"))],
                          list(REGISTRY))
    with pytest.raises(ExperimentError, match=r"experiment 'e1': vis_und_data.pope: file .* does not exist"):
        parse_experiments([_exp(tmp_path, eval_type=["vis_und"], vis_und_data={"pope": "x.tsv"})], list(REGISTRY))
    with pytest.raises(ExperimentError, match=r"experiment 'e1': model_path: dir .* does not exist.*bash train.sh"):
        parse_experiments([_exp(tmp_path, model_path=str(tmp_path / "none"))], list(REGISTRY))
    world = tmp_path / "world"
    world.mkdir()
    (world / "world.json").write_text(json.dumps({"seed": 1, "image_size": 32}))
    with pytest.raises(ExperimentError, match=r"experiment 'e1': shapes_vqa_seed: 1 is the seed of the training"):
        parse_experiments([_exp(tmp_path, eval_type=["shapes_vqa"], shapes_world=str(world))], list(REGISTRY))
    with pytest.raises(ExperimentError, match=r"experiment 'e1': shapes_world: .* has no world.json.*bash train.sh"):
        parse_experiments([_exp(tmp_path, eval_type=["shapes"], shapes_world=str(tmp_path))], list(REGISTRY))
    ok = parse_experiments([_exp(tmp_path)], list(REGISTRY), overrides={"cfg": 2.5})
    assert ok[0].cfg == 2.5 and ok[0].eval_type == ["text"]


def test_registry_is_lazy_and_names_the_known_benchmarks():
    code = ("import sys, evaluation.benchmarks as b; "
            "print(any(m.startswith('evaluation.benchmarks.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # importing the registry imports no benchmark
    assert {e["name"] for e in EXPERIMENTS} == {"shapes-tiny-uni-x"}
    assert set(EXPERIMENTS[0]["eval_type"]) <= set(REGISTRY)
    assert get_benchmark("shapes").kind == "t2i" and get_benchmark("shapes_vqa").kind == "vqa"
    with pytest.raises(KeyError, match="unknown benchmark 'nope'; known: shapes"):
        get_benchmark("nope")


def test_a_fresh_clone_is_told_which_command_makes_a_checkpoint(tmp_path):
    """From a folder with no outputs/: exit 2, the train.sh hint, no traceback."""
    out = subprocess.run([sys.executable, str(ROOT / "evaluation" / "eval_template.py")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "bash train.sh" in out.stderr and "model_path" in out.stderr and "shapes-tiny-uni-x" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_help_lists_the_options_and_the_experiment_keys(tmp_path):
    """fire takes ``--help`` as an override of a ``**overrides`` main ("--help: unknown key"); it must print usage."""
    out = subprocess.run([sys.executable, str(ROOT / "evaluation" / "eval_template.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("--eval_type", "--limit", "--only", "model_path", "t2i_sampling", "Experiment keys"):
        assert word in out.stdout, word
    assert "unknown key" not in out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------- end to end
class Stop(KeyboardInterrupt):
    """A Ctrl-C from a counting wrapper."""


@pytest.fixture
def setup(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "shapes")
    world = tmp_path / "world"
    build(str(world), num_images=4, seed=0, image_size=32, num_text=2, geneval_per_tag=1, heldout_pairs=2)
    exp = {"name": "tiny", "model_path": str(ckpt), "shapes_world": str(world), "eval_type": ["shapes"],
           "shapes_per_tag": 2, "shapes_unseen_per_pair": 1, "n_samples": 2, "t2i_batch_prompts": 4,
           "shapes_vqa_scenes": 2, "vis_und_threads": 1, "vis_und_api_nproc": 4, "vis_und_max_tokens": 4}
    exp_file = tmp_path / "exp.py"
    exp_file.write_text(f"EXPERIMENTS = [{exp!r}]\n")
    return {"ckpt": ckpt, "exp_file": str(exp_file), "out": tmp_path / "eval"}


def test_end_to_end_resumes_without_redoing_anything(setup, monkeypatch):
    from evaluation import eval_template
    from evaluation.benchmarks import shapes
    from evaluation.uni_infer import UniInfer
    from modeling.vq.base import file_hash
    from tools.bench_server import ServerProcess

    counts = {"prompts": 0, "scored": 0, "asked": 0, "servers": 0}
    stop_at = {"generate_calls": None, "scored": None, "asked": None}
    calls = {"generate": 0}
    real_generate, real_score, real_ask_fn = UniInfer.generate_images, shapes.ShapesScorer.__call__, \
        shapes.conversation_ask_fn

    def generate(self, prompts, *args, **kwargs):
        calls["generate"] += 1
        if stop_at["generate_calls"] is not None and calls["generate"] > stop_at["generate_calls"]:
            raise Stop()
        counts["prompts"] += len(prompts)
        return real_generate(self, prompts, *args, **kwargs)

    def score(self, image, metadata):
        if stop_at["scored"] is not None and counts["scored"] >= stop_at["scored"]:
            raise Stop()
        counts["scored"] += 1
        return real_score(self, image, metadata)

    def ask_fn(*args, **kwargs):
        ask = real_ask_fn(*args, **kwargs)

        def counted(*a, **k):
            if stop_at["asked"] is not None and counts["asked"] >= stop_at["asked"]:
                raise ConnectionError("the client failed")
            counts["asked"] += 1
            return ask(*a, **k)
        return counted

    real_servers = eval_template.servers

    @contextlib.contextmanager
    def servers(exp):
        counts["servers"] += 1
        with real_servers(exp) as urls:
            yield urls

    monkeypatch.setattr(eval_template, "servers", servers)
    monkeypatch.setattr(UniInfer, "generate_images", generate)
    monkeypatch.setattr(shapes.ShapesScorer, "__call__", score)
    monkeypatch.setattr(shapes, "conversation_ask_fn", ask_fn)
    run = dict(exp_file=setup["exp_file"], out_dir=str(setup["out"]), charts=False)
    n_prompts = 6 * 2 + 2 * 1  # 2 per tag + 1 per held-out pair
    n_images = n_prompts * 2 + 2 * n_prompts  # the model's 2 samples, ground truth, VQ round trip

    # 1. interrupted while drawing: 2 of the 4 generate calls (4 prompts each) finish
    stop_at["generate_calls"] = 2
    with pytest.raises(Stop):
        eval_template.main(**run)
    assert counts == {"prompts": 8, "scored": 0, "asked": 0, "servers": 0}
    # 2. drawing finishes (only the 6 missing prompts), scoring is interrupted after 10 images
    stop_at.update(generate_calls=None, scored=10)
    with pytest.raises(Stop):
        eval_template.main(**run)
    assert counts["prompts"] == n_prompts and counts["scored"] == 10
    # 3. the rest is scored, then the VQA client fails after one answer: the server is stopped all the same
    stop_at.update(scored=None, asked=1)
    started = []
    real_init = ServerProcess.__init__

    def init(self, *args, **kwargs):
        started.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ServerProcess, "__init__", init)
    with pytest.raises(RuntimeError, match="the client failed"):
        eval_template.main(**run, eval_type="shapes,shapes_vqa,text", limit=3)
    assert counts == {"prompts": n_prompts, "scored": n_images, "asked": 1, "servers": 1}
    assert len(started) == 1 and started[0].proc.poll() is not None  # the server process has exited
    answers = setup["out"] / "tiny" / "shapes_vqa" / "answers.jsonl"
    kept = len(answers.read_text().splitlines())  # the answer may have been in flight when the failure came
    # 4. everything, with the VQA set and the text task (small subsets): nothing drawn, scored or answered again
    stop_at["asked"] = None
    eval_template.main(**{**run, "charts": True}, eval_type="shapes,shapes_vqa,text", limit=3)
    asked = 1 + 3 - kept
    assert counts == {"prompts": n_prompts, "scored": n_images, "asked": asked, "servers": 2}
    assert started[1].proc.poll() is not None and len(answers.read_text().splitlines()) == 3
    # 5. a rerun draws, scores and asks nothing (and starts no server: every answer is on disk)
    eval_template.main(**run, eval_type="shapes,shapes_vqa,text", limit=3)
    assert counts == {"prompts": n_prompts, "scored": n_images, "asked": asked, "servers": 2}

    out = setup["out"] / "tiny"
    res = json.loads((out / "shapes" / "results.json").read_text())
    assert res["ground_truth"]["overall"] == 1.0  # the detector agrees with the world
    assert res["ground_truth"]["splits"]["unseen"]["overall"] == 1.0 and res["model"]["images"] == 2 * n_prompts
    assert set(res["model"]["splits"]) == {"seen", "unseen"} and len(res["unseen_pairs"]) == 2
    settings = res["settings"]
    assert settings["checkpoint_sha256"] == file_hash(setup["ckpt"] / "model.safetensors")
    assert settings["cfg_scale"] == 4.0 and settings["seed"] == 0 and "top_p" in settings["sampling"]
    assert settings["scorer"]["detector"].endswith("detect") and len(settings["scorer"]["source_sha256"]) == 12
    assert settings["image_tokenizer"]["tokenizer_id"].startswith("shapes-vq@")
    lines = (out / "shapes" / "model" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 * n_prompts and {"filename", "tag", "prompt", "correct", "reason", "metadata",
                                            "details"} <= set(json.loads(lines[0]))
    vqa = json.loads((out / "shapes_vqa" / "results.json").read_text())
    assert vqa["metrics"]["questions"] == 3 and 0 <= vqa["headline"]["accuracy"] <= 100
    assert len((out / "shapes_vqa" / "answers.jsonl").read_text().splitlines()) == 3
    text = json.loads((out / "text" / "results.json").read_text())
    assert "shapes_facts_acc" in text["headline"] and text["request"]["limit"] == 3
    summary = (setup["out"] / "summary.csv").read_text().splitlines()
    assert summary[0] == "experiment,benchmark,metric,value"
    assert {tuple(r.split(",")[:2]) for r in summary[1:]} == {("tiny", b) for b in ("shapes", "shapes_vqa", "text")}
    assert "## shapes" in (setup["out"] / "summary.md").read_text()
    assert all((setup["out"] / "charts" / f"{b}.png").stat().st_size > 1000 for b in ("shapes", "shapes_vqa", "text"))


def test_one_generating_process_per_device_draws_the_same_images(setup, tmp_path):
    """``t2i_devices: [cpu, cpu]`` spawns two processes that split the prompts; every image equals the one a single
    process draws (image i of a prompt is seeded seed + i, whatever the batch)."""
    from evaluation import eval_template

    run = dict(exp_file=setup["exp_file"], eval_type="shapes", limit=1, charts=False)
    eval_template.main(**run, out_dir=str(tmp_path / "two"), t2i_devices=["cpu", "cpu"])
    eval_template.main(**run, out_dir=str(tmp_path / "one"))
    two = sorted((tmp_path / "two" / "tiny" / "shapes" / "model").glob("*/samples/*.png"))
    one = sorted((tmp_path / "one" / "tiny" / "shapes" / "model").glob("*/samples/*.png"))
    assert len(two) == len(one) == (6 + 1) * 2  # 1 prompt per tag and pair split, 2 samples each
    assert [p.relative_to(tmp_path / "two").as_posix() for p in two] == \
        [p.relative_to(tmp_path / "one").as_posix() for p in one]
    assert [p.read_bytes() for p in two] == [p.read_bytes() for p in one]


def test_public_benchmarks_through_the_orchestrator(tmp_path):
    """GenEval (tiny random Mask2Former + CLIP), DPG-Bench (judged by the experiment's own server, started and
    stopped by the orchestrator) and POPE through the server, from the experiment's paths, with --limit."""
    import base64
    import csv
    import io

    from PIL import Image

    from evaluation import eval_template
    from modeling.vq.base import file_hash
    from tests.test_dpg_bench import write_csv
    from tests.test_geneval import build_tiny_models

    ckpt = make_checkpoint(tmp_path / "ckpt", "shapes")
    det, clip = build_tiny_models(tmp_path / "models")
    meta = tmp_path / "evaluation_metadata.jsonl"
    lines = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
             {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
             {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
              "prompt": "a photo of two cats"}]
    meta.write_text("".join(json.dumps(m) + "\n" for m in lines))
    prompts = tmp_path / "dpg_prompts"
    prompts.mkdir()
    (prompts / "1.txt").write_text("a red dog left of a cat")
    (prompts / "2.txt").write_text("a tall tree")
    questions = write_csv(tmp_path / "dpg_bench.csv")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, format="PNG")
    pope = tmp_path / "POPE.tsv"
    with pope.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "answer", "category"])
        for i, (ans, split) in enumerate([("yes", "random"), ("no", "popular"), ("yes", "adversarial")]):
            w.writerow([i, base64.b64encode(buf.getvalue()).decode(), "Is there a red square?", ans, split])
    exp = {"name": "pub", "model_path": str(ckpt), "eval_type": ["geneval", "dpg_bench", "vis_und"],
           "geneval_prompts_path": str(meta), "geneval_detector_path": str(det), "geneval_clip_path": str(clip),
           "dpg_bench_prompts_path": str(prompts), "dpg_bench_questions_path": str(questions),
           "vis_und_data": {"pope": str(pope)}, "n_samples": 1, "vis_und_threads": 1, "vis_und_max_tokens": 4}
    exp_file = tmp_path / "exp.py"
    exp_file.write_text(f"EXPERIMENTS = [{exp!r}]\n")
    out = tmp_path / "eval"
    eval_template.main(exp_file=str(exp_file), out_dir=str(out), limit=1, charts=False)

    gen = json.loads((out / "pub" / "geneval" / "results.json").read_text())
    assert gen["images"] == 2 and set(gen["tags"]) == {"single_object", "counting"}  # 1 prompt per tag
    assert (out / "pub" / "geneval" / "00000" / "samples" / "0000.png").is_file()
    assert not (out / "pub" / "geneval" / "00001").exists()  # the limit: line 2 is the second single_object
    assert gen["settings"]["checkpoint_sha256"] == file_hash(ckpt / "model.safetensors")
    assert gen["scorer"]["detector"]["weights_sha256"] and set(gen["headline"]) >= {"overall", "counting"}
    dpg = json.loads((out / "pub" / "dpg_bench" / "results.json").read_text())
    assert dpg["judge"]["base_url"].startswith("http://127.0.0.1:") and dpg["judge"]["model"] == "pub"
    assert sorted(p.name for p in (out / "pub" / "dpg_bench" / "images").iterdir()) == ["1.png"]
    vis = json.loads((out / "pub" / "vis_und" / "results.json").read_text())
    assert set(vis["headline"]) == {"pope_accuracy", "pope_f1"} and vis["metrics"]["pope"]["overall"]["questions"] == 1
    rows = (out / "summary.csv").read_text().splitlines()
    assert {r.split(",")[1] for r in rows[1:]} == {"geneval", "dpg_bench", "vis_und"}
