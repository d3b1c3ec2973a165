"""DPG-Bench (evaluation/benchmarks/dpg_bench.py): reading and validating ELLA's prompts and question csv, 2x2 grids,
ELLA's dependency rule by hand, the score arithmetic, and a whole run against a scripted in-process judge: known
scores, a rerun and an interrupted run ask no question twice, a regenerated grid is asked again."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from evaluation.benchmarks import dpg_bench as dpg
from evaluation.benchmarks.dpg_bench import Question

HEADER = ["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
          "tuple", "question_natural_language"]
ROWS = [  # (item, proposition, dependency, tuple, question)
    ("1", 1, "0", "entity - whole (dog)", "Is there a dog?"),
    ("1", 2, "1", "attribute - color (dog, red)", "Is the dog red?"),
    ("1", 3, "0", "entity - whole (cat)", "Is there a cat?"),
    ("1", 4, "1,3", "relation - spatial (dog, cat, left of)", "Is the dog left of the cat?"),
    ("2", 1, "0", "entity - whole (tree)", "Is there a tree?"),
    ("2", 2, "1", "attribute - size (tree, tall)", "Is the tree tall?"),
]


def write_csv(path: Path, rows=ROWS, header=HEADER) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for item, pid, dep, tup, q in rows:
            full = {"item_id": item, "text": "prompt, with a comma", "keywords": "", "proposition_id": pid,
                    "dependency": dep, "category_broad": tup.split(" - ")[0], "category_detailed": "x", "tuple": tup,
                    "question_natural_language": q}
            w.writerow([full.get(h, "") for h in header])
    return path


def q(pid: int, parents=(0,)) -> Question:
    return Question("p", pid, tuple(parents), f"q{pid}?", "entity - whole", "entity", f"f.csv:{pid + 1}")


# ------------------------------------------------------------------------------------------------ reading
def test_load_prompts_in_item_order(tmp_path):
    for name, text in (("10", "ten\n"), ("2", "two"), ("partiprompts5", " a word ")):
        (tmp_path / f"{name}.txt").write_text(text)
    assert dpg.load_prompts(tmp_path) == {"2": "two", "10": "ten", "partiprompts5": "a word"}
    (tmp_path / "3.txt").write_text("  \n")
    with pytest.raises(dpg.DPGDataError, match=r"3\.txt:1: prompt: empty"):
        dpg.load_prompts(tmp_path)


def test_load_questions_reads_every_row_with_categories(tmp_path):
    qs = dpg.load_questions(write_csv(tmp_path / "dpg.csv"))
    assert list(qs) == ["1", "2"]
    first = qs["1"][0]  # ELLA's script skips the csv's first data row; it is kept here
    assert (first.proposition_id, first.parents, first.category, first.broad) == (1, (0,), "entity - whole", "entity")
    assert qs["1"][3].parents == (1, 3) and qs["1"][3].broad == "relation"
    assert qs["2"][1].source.endswith("dpg.csv:7")


@pytest.mark.parametrize("rows, header, message", [
    (ROWS, [h for h in HEADER if h != "dependency"], r"dpg\.csv:1: header: missing columns \['dependency'\]"),
    (ROWS[:2] + [("1", "three", "0", "entity - whole (cat)", "Is there a cat?")], HEADER,
     r"dpg\.csv:4: proposition_id: expected an integer, got 'three'"),
    (ROWS[:2] + [("1", 3, "1;2", "entity - whole (cat)", "Is there a cat?")], HEADER,
     r"dpg\.csv:4: dependency: expected an integer, got '1;2'"),
    (ROWS[:2] + [("1", 2, "0", "entity - whole (cat)", "Is there a cat?")], HEADER,
     r"dpg\.csv:4: proposition_id: 2 appears twice for item '1'"),
    (ROWS[:2] + [("1", 3, "1,5", "entity - whole (cat)", "Is there a cat?")], HEADER,
     r"dpg\.csv:4: dependency: parents \[5\] are not propositions of item '1'"),
    (ROWS[:2] + [("1", 3, "0", "entity - whole (cat)", " ")], HEADER,
     r"dpg\.csv:4: question_natural_language: empty"),
])
def test_load_questions_errors_name_line_and_column(tmp_path, rows, header, message):
    with pytest.raises(dpg.DPGDataError, match=message):
        dpg.load_questions(write_csv(tmp_path / "dpg.csv", rows, header))


def test_grid_round_trip():
    images = [Image.new("RGB", (6, 4), (40 * k, 0, 0)) for k in range(4)]
    grid = dpg.make_grid(images)
    assert grid.size == (12, 8) and grid.getpixel((7, 1)) == (40, 0, 0) and grid.getpixel((1, 5)) == (80, 0, 0)
    assert [c.tobytes() for c in dpg.split_grid(grid)] == [im.tobytes() for im in images]
    with pytest.raises(ValueError, match="even sides"):
        dpg.split_grid(Image.new("RGB", (7, 8)))


# -------------------------------------------------------------------------------------------------- rules
@pytest.mark.parametrize("questions, yes, expected", [
    ([q(1), q(2)], {1: True, 2: False}, {1: 1.0, 2: 0.0}),                       # no dependencies
    ([q(1), q(2, [1])], {1: False, 2: True}, {1: 0.0, 2: 0.0}),                  # a failed parent zeroes
    ([q(1), q(2, [1]), q(3, [2])], {1: False, 2: True, 3: True}, {1: 0.0, 2: 0.0, 3: 0.0}),  # down the chain
    ([q(1), q(2), q(3, [1, 2])], {1: True, 2: False, 3: True}, {1: 1.0, 2: 0.0, 3: 0.0}),    # any parent
    ([q(1), q(2, [0, 1])], {1: True, 2: True}, {1: 1.0, 2: 1.0}),                # 0 is "no parent"
    # csv order decides: the child listed before its parent's own zeroing still sees the parent's raw yes
    ([q(1), q(2, [3]), q(3, [1])], {1: False, 2: True, 3: True}, {1: 0.0, 2: 1.0, 3: 0.0}),
])
def test_dependencies(questions, yes, expected):
    assert dpg.apply_dependencies(questions, yes) == expected


def test_prompt_score_is_the_mean_over_crops_of_the_mean_over_questions():
    qs = [q(1), q(2, [1]), q(3)]
    crops = [{1: True, 2: True, 3: True}, {1: False, 2: True, 3: True}, {1: True, 2: False, 3: False},
             {1: False, 2: False, 3: False}]
    out = dpg.score_prompt(qs, crops)
    assert out["crop_scores"] == pytest.approx([1.0, 1 / 3, 1 / 3, 0.0])
    assert out["score"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 4)


# ------------------------------------------------------------------------------------ a run with a fake judge
CROP_COLORS = [(0, 0, 0), (60, 0, 0), (120, 0, 0), (180, 0, 0)]
# What the judge sees in crop k (by its colour): "y" yes, "n" no, "?" an unreadable reply.
SCRIPT = {
    "Is there a dog?": "ynyy", "Is the dog red?": "yyy?", "Is there a cat?": "yyny",
    "Is the dog left of the cat?": "yyyy",
    "Is there a tree?": "yyyy", "Is the tree tall?": "nnnn",
}
REPLIES = {"y": ["Yes.", "yes", "Yes, there is."], "n": ["No.", "no, it is not"], "?": ["I cannot tell."]}


class ScriptedJudge:
    """Answers by the crop (read from its colour) and the question; can fail after ``fail_after`` questions."""

    def __init__(self, fail_after: int | None = None):
        self.asked: list[tuple[int, str]] = []
        self.fail_after = fail_after

    def __call__(self, image: bytes, prompt: str, options=None) -> str:
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise ConnectionError("judge went away")
        assert prompt.endswith(" Please answer yes or no.")
        question = prompt[: -len(" Please answer yes or no.")]
        crop = CROP_COLORS.index(Image.open(io.BytesIO(image)).convert("RGB").getpixel((0, 0)))
        self.asked.append((crop, question))
        kind = SCRIPT[question][crop]
        return REPLIES[kind][len(self.asked) % len(REPLIES[kind])]


def draw(prompts, n, numbers):
    assert len(numbers) == len(prompts)
    return [[Image.new("RGB", (8, 8), CROP_COLORS[k]) for k in range(n)] for _ in prompts]


N_QUESTIONS = 4 * len(ROWS)  # every question on every crop


def test_run_scores_known_values_and_asks_nothing_twice(tmp_path):
    questions = dpg.load_questions(write_csv(tmp_path / "dpg.csv"))
    prompts = {"1": "a red dog left of a cat", "2": "a tall tree"}
    out = tmp_path / "out"
    assert dpg.generate(draw, prompts, out) == ["1", "2"] and dpg.generate(draw, prompts, out) == []

    # Interrupted after 10 answers: those stay on disk and are not asked again.
    with pytest.raises(RuntimeError, match="asking failed: ConnectionError"):
        dpg.score_folder(out, questions, ScriptedJudge(fail_after=10), parallel=1)
    assert len((out / "answers.jsonl").read_text().splitlines()) == 10
    judge = ScriptedJudge()
    summary = dpg.score_folder(out, questions, judge, item_ids=list(prompts), parallel=2, judge_info={"model": "fake"})
    assert len(judge.asked) == N_QUESTIONS - 10 and len(set(judge.asked)) == N_QUESTIONS - 10

    # Prompt 1, per crop after dependencies: [1,1,1,1] 1; [0,0,1,0] .25; [1,1,0,0] .5; [1,0,1,1] .75 -> .625.
    # Prompt 2: [1,0] on every crop -> .5. Overall 100 x (.625 + .5) / 2.
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["item_id"] for r in rows] == ["1", "2"]
    assert rows[0]["crop_scores"] == pytest.approx([1.0, 0.25, 0.5, 0.75]) and rows[0]["score"] == pytest.approx(0.625)
    assert rows[1]["crop_scores"] == pytest.approx([0.5] * 4)
    assert summary["overall"] == pytest.approx(56.25)
    # Categories pool raw answers (before dependencies) over all crops: entity 10/12, attribute 3/8, relation 4/4.
    assert summary["broad"] == pytest.approx({"entity": 100 * 10 / 12, "attribute": 37.5, "relation": 100.0})
    assert summary["detailed"]["attribute - color"] == pytest.approx(75.0)
    assert summary["unreadable_answers"] == 1 and summary["judge"] == {"model": "fake"}
    assert json.loads((out / "results.json").read_text()) == summary

    # ELLA's exact category rule reads the last crop only.
    last = dpg.summarize(rows, questions, category_crops="last")
    assert last["broad"] == {"attribute": 0.0, "entity": 100.0, "relation": 100.0} and last["overall"] == 56.25

    # A rerun asks nothing; a regenerated grid has a new hash, so only its questions are asked again.
    judge = ScriptedJudge()
    assert dpg.score_folder(out, questions, judge, judge_info={"model": "fake"}) == summary and judge.asked == []
    dpg.grid_path(out, "2").unlink()
    dpg.generate(lambda p, n, k: [draw(p, n, k)[0][::-1] for _ in p], prompts, out)  # crops in reverse order
    judge = ScriptedJudge()
    dpg.score_folder(out, questions, judge)
    assert sorted(judge.asked) == sorted((c, qq) for c in range(4) for qq in ("Is there a tree?", "Is the tree tall?"))


def test_score_folder_needs_every_grid(tmp_path):
    questions = dpg.load_questions(write_csv(tmp_path / "dpg.csv"))
    dpg.generate(draw, {"1": "p"}, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"1 grids missing .*\['2'\]"):
        dpg.score_folder(tmp_path, questions, ScriptedJudge())
    with pytest.raises(dpg.DPGDataError, match=r"no questions for items \['7'\]"):
        dpg.score_folder(tmp_path, questions, ScriptedJudge(), item_ids=["1", "7"])


def test_openai_judge_over_http(tmp_path):
    """The judge through the real openai client against a minimal in-process OpenAI-style endpoint: the crop
    arrives as a PNG data: URL beside the question, and the settings are recorded (not the key)."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, tuple[int, int, int]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            image, text = body["messages"][0]["content"]
            assert self.path == "/v1/chat/completions" and body["model"] == "judge-model"
            png = base64.b64decode(image["image_url"]["url"].removeprefix("data:image/png;base64,"))
            seen.append((text["text"], Image.open(io.BytesIO(png)).convert("RGB").getpixel((0, 0))))
            reply = "Yes, there is." if text["text"].startswith("Is there") else "No."
            data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "judge-model",
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge, info = dpg.openai_judge(f"http://127.0.0.1:{server.server_port}", "judge-model", api_key="secret")
        questions = dpg.load_questions(write_csv(tmp_path / "dpg.csv"))
        dpg.generate(draw, {"2": "a tall tree"}, tmp_path)
        summary = dpg.score_folder(tmp_path, questions, judge, item_ids=["2"], parallel=2, judge_info=info)
    finally:
        server.shutdown()
    assert sorted(seen) == sorted((f"{qq} Please answer yes or no.", c) for c in CROP_COLORS
                                  for qq in ("Is there a tree?", "Is the tree tall?"))
    assert summary["overall"] == pytest.approx(50.0)  # tree yes, tall no on every crop
    assert summary["judge"]["model"] == "judge-model" and "secret" not in json.dumps(summary)


def test_each_item_is_drawn_with_its_own_stable_number(tmp_path):
    """The numbers (hence seeds) of an item depend on its id only: not on the batch or the other prompts."""
    seen = {}

    def spy(prompts, n, numbers):
        seen.update(zip(prompts, numbers))
        return draw(prompts, n, numbers)

    dpg.generate(spy, {"1": "a", "2": "b", "3": "c"}, tmp_path / "all", batch_prompts=2)
    alone = {}
    dpg.generate(lambda p, n, k: alone.update(zip(p, k)) or draw(p, n, k), {"3": "c"}, tmp_path / "one")
    assert seen["c"] == alone["c"] == dpg.prompt_number("3") and len(set(seen.values())) == 3
