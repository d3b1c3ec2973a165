"""evaluation/benchmarks/vis_und.py: VLMEvalKit TSVs, answer extraction, MME / POPE / MMBench scores against
hand-computed cases, a resumed run that asks nothing twice, and one small run against the real server."""

from __future__ import annotations

import base64
import csv
import io
import json
import threading

import pytest
from PIL import Image

from evaluation.benchmarks.vis_und import (
    Scored, VQAItem, extract_answer, image_data_url, load_tsv, mmbench_scores, mme_scores, pope_scores, run_vqa,
)


def _png(colour=(255, 0, 0), size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


B64 = base64.b64encode(_png()).decode()


def _write_tsv(path, columns, rows):
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(columns)
        w.writerows(rows)
    return path


def _item(benchmark, index, answer, category="c", image_key="img", options=None, l2=None) -> VQAItem:
    return VQAItem(benchmark=benchmark, index=index, image=b"", question="q", answer=answer, category=category,
                   source="t", options=options, l2_category=l2, image_key=image_key)


def _scored(item: VQAItem, extracted) -> Scored:
    return Scored(item, str(extracted), extracted)


# ------------------------------------------------------------------------------------------------ reading
def test_load_mme_resolves_image_references_and_keeps_columns(tmp_path):
    path = _write_tsv(tmp_path / "MME.tsv", ["index", "image", "question", "answer", "category", "image_path"], [
        [0, B64, "Is there a red square? Please answer yes or no.", "Yes", "color", "color/1.png"],
        [1, "0", "Is there a blue square? Please answer yes or no.", "No", "color", "color/1.png"],
    ])
    a, b = load_tsv(path, "mme")
    assert a.image == b.image == _png() and a.image_key == b.image_key == "color/1.png"
    assert (a.answer, b.answer, a.index, b.kind) == ("yes", "no", 0, "yes_no")
    assert a.prompt == a.question  # already asks for yes/no: nothing appended
    pope = _write_tsv(tmp_path / "POPE.tsv", ["index", "image", "question", "answer", "category"],
                      [[7, B64, "Is there a cat in the image?", "no", "popular,random"]])
    (p,) = load_tsv(pope, "pope")
    assert p.splits == ("popular", "random") and p.prompt.endswith("Please answer yes or no.")


def test_load_mmbench_options_hint_and_prompt(tmp_path):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split"]
    path = _write_tsv(tmp_path / "MMBench.tsv", cols, [
        [5, "What colour?", "", "red", "blue", "", "", "A", "attr", B64, "fine", "dev"],
        [1000005, "What colour?", "", "blue", "red", "", "", "B", "attr", "5", "fine", "dev"],
    ])
    a, b = load_tsv(path, "mmbench")
    assert a.options == {"A": "red", "B": "blue"} and b.options == {"A": "blue", "B": "red"}
    assert a.l2_category == "fine" and a.hint is None and a.extra == {"split": "dev"}
    assert a.prompt.splitlines() == ["Question: What colour?", "A. red", "B. blue",
                                     "Answer with the option's letter from the given choices directly."]


@pytest.mark.parametrize("case,row,message", [
    ("bad base64", [0, "!!!" * 30, "q", "Yes", "color"], r"MME.tsv:2: column 'image': the base64 does not decode"),
    ("dangling ref", [0, "9", "q", "Yes", "color"], r"MME.tsv:2: column 'image': '9' is neither base64"),
    ("not yes/no", [0, B64, "q", "Maybe", "color"], r"MME.tsv:2: column 'answer': 'Maybe' is neither Yes nor No"),
    ("empty question", [0, B64, "", "Yes", "color"], r"MME.tsv:2: column 'question' is empty"),
])
def test_bad_rows_name_file_line_and_column(tmp_path, case, row, message):
    path = _write_tsv(tmp_path / "MME.tsv", ["index", "image", "question", "answer", "category"], [row])
    with pytest.raises(ValueError, match=message):
        load_tsv(path, "mme")


def test_bad_files_name_the_problem(tmp_path):
    cols = ["index", "image", "question", "answer", "category"]
    dup = _write_tsv(tmp_path / "dup.tsv", cols, [[0, B64, "q", "Yes", "c"], [0, B64, "q", "No", "c"]])
    with pytest.raises(ValueError, match=r"dup.tsv:3: column 'index': 0 repeats line 2"):
        load_tsv(dup, "pope")
    with pytest.raises(ValueError, match=r"nohead.tsv:1: missing column\(s\) \['answer'\]"):
        load_tsv(_write_tsv(tmp_path / "nohead.tsv", ["index", "image", "question", "category"], []), "mme")
    mm = ["index", "question", "A", "B", "answer", "category", "image"]
    with pytest.raises(ValueError, match=r"mm.tsv:2: column 'answer': 'C' is not one of the options \['A', 'B'\]"):
        load_tsv(_write_tsv(tmp_path / "mm.tsv", mm, [[1, "q", "x", "y", "C", "c", B64]]), "mmbench")
    with pytest.raises(ValueError, match=r"rot.tsv:2: column 'index': rotated question 1000003 has no original 3"):
        load_tsv(_write_tsv(tmp_path / "rot.tsv", mm, [[1000003, "q", "x", "y", "A", "c", B64]]), "mmbench")


# ------------------------------------------------------------------------------------------------ answers
@pytest.mark.parametrize("text,want", [
    ("Yes.", "yes"), ("yes", "yes"), ("YES, it is", "yes"), ("No", "no"), ("no.", "no"),
    ("I think the answer is yes", "yes"), ("maybe", None), ("", None), ("maybe yes, maybe no", None),
])
def test_extract_yes_no(text, want):
    assert extract_answer(text, "yes_no") == want


OPTIONS = {"A": "red", "B": "blue", "C": "dark green", "D": "green"}


@pytest.mark.parametrize("text,want", [
    ("A", "A"), ("A.", "A"), ("(A)", "A"), ("The answer is A", "A"), ("The answer is (C).", "C"),
    ("Answer: B", "B"), ("b", "B"), ("B. blue", "B"), ("blue", "B"), ("Dark green", "C"), ("I pick D", "D"),
    ("A red one.", "A"),  # by the option's text; the article is not read as a letter
    ("E", None), ("purple", None), ("green or dark green", None), ("A or B", None),
])
def test_extract_choice(text, want):
    assert extract_answer(text, "choice", OPTIONS) == want


# ------------------------------------------------------------------------------------------------ metrics
def test_mme_acc_plus_and_totals_by_hand():
    """existence: picture 1 both right, picture 2 one right -> acc 75, acc+ 50, score 125; count: both wrong -> 0;
    code_reasoning: one of two right -> 50 + 0. Perception 125, cognition 50."""
    rows = [("existence", "p1", "yes", "yes"), ("existence", "p1", "no", "no"),
            ("existence", "p2", "yes", "yes"), ("existence", "p2", "no", "yes"),
            ("count", "p3", "yes", "no"), ("count", "p3", "no", None),
            ("code_reasoning", "p4", "yes", "yes"), ("code_reasoning", "p4", "no", "yes")]
    scored = [_scored(_item("mme", i, ans, cat, key), got) for i, (cat, key, ans, got) in enumerate(rows)]
    m = mme_scores(scored)
    assert m["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "questions": 4, "images": 2}
    assert m["subtasks"]["count"]["score"] == 0.0
    assert m["subtasks"]["code_reasoning"] == pytest.approx({"acc": 50.0, "acc_plus": 0.0, "score": 50.0,
                                                            "questions": 2, "images": 1})
    assert (m["perception"], m["cognition"], m["total"]) == (125.0, 50.0, 175.0)
    assert "OCR" in m["perception_missing"] and "code_reasoning" not in m["cognition_missing"]


def test_pope_by_hand():
    """random: truths y,y,n,n replies y,None,y,n -> tp 1 fp 1 fn 1: acc 50, P 50, R 50, F1 50, yes 50.
    popular (the last row also counts in random): truths y,n,n replies y,n,y -> tp 1 fp 1 fn 0: acc 2/3,
    P 50, R 100, F1 2/3, yes 2/3."""
    rows = [("random", "yes", "yes"), ("random", "yes", None), ("random", "no", "yes"),
            ("popular", "yes", "yes"), ("popular", "no", "yes"), ("popular,random", "no", "no")]
    m = pope_scores([_scored(_item("pope", i, ans, split), got) for i, (split, ans, got) in enumerate(rows)])
    r, p = m["splits"]["random"], m["splits"]["popular"]
    assert r == pytest.approx({"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 50.0,
                               "questions": 4})
    assert p == pytest.approx({"accuracy": 200 / 3, "precision": 50.0, "recall": 100.0, "f1": 200 / 3,
                               "yes_ratio": 200 / 3, "questions": 3})
    # overall: 6 rows, truths y,y,n,y,n,n; replies y,-,y,y,y,n -> tp 2 fp 2 fn 1, 3 right: F1 = 2PR/(P+R) = 4/7
    assert m["overall"] == pytest.approx({"accuracy": 50.0, "precision": 50.0, "recall": 200 / 3,
                                          "f1": 400 / 7, "yes_ratio": 200 / 3, "questions": 6})


def test_mmbench_circular_failure_by_hand():
    """Question 1: four rotations, all right (passes). Question 2: its original right but one rotation wrong
    (fails circular, counts in vanilla). Question 3: no rotations, right. Circular 2/3, vanilla 3/3."""
    rows = [(1, "A", "A", "attr"), (1000001, "B", "B", "attr"), (2000001, "C", "C", "attr"),
            (3000001, "D", "D", "attr"),
            (2, "B", "B", "attr"), (1000002, "C", "C", "attr"), (2000002, "D", "A", "attr"),
            (3, "A", "A", "logic")]
    scored = [_scored(_item("mmbench", idx, ans, cat, l2="L" + cat), got) for idx, ans, got, cat in rows]
    m = mmbench_scores(scored)
    assert m["circular"] == pytest.approx(200 / 3) and m["vanilla"] == 100.0
    assert (m["questions"], m["rows"]) == (3, 8)
    assert m["categories"] == {"attr": 50.0, "logic": 100.0} and m["l2_categories"] == {"Lattr": 50.0, "Llogic": 100.0}


# ------------------------------------------------------------------------------------------------ running
def _mmbench_file(tmp_path):
    cols = ["index", "question", "A", "B", "answer", "category", "image"]
    rows = [[i, f"question {i}", "red", "blue", "A" if i % 2 else "B", "attr", B64 if i == 0 else "0"]
            for i in range(6)]
    return load_tsv(_write_tsv(tmp_path / "mm.tsv", cols, rows), "mmbench")


def test_a_resumed_run_asks_nothing_twice(tmp_path):
    """A run that dies on its fourth question (after a torn write), rerun: only the missing questions are asked,
    each reply is on disk once, and the score is the one a clean run gives."""
    items = _mmbench_file(tmp_path)
    asked: list[str] = []
    lock = threading.Lock()

    def ask(image, prompt, options):
        assert image == _png() and options == {"A": "red", "B": "blue"}
        with lock:
            asked.append(prompt)
            if len(asked) == 4 and fail:
                raise ConnectionError("server gone")
        return "A"

    fail = True
    with pytest.raises(RuntimeError, match=r"mmbench question \d+ .*asking failed: ConnectionError: server gone"):
        run_vqa(items, ask, tmp_path / "out", parallel=1)
    answers = tmp_path / "out" / "answers.jsonl"
    first = [json.loads(line)["index"] for line in answers.read_text().splitlines()]
    assert len(first) == 3 and not (tmp_path / "out" / "results.json").exists()
    with answers.open("a") as f:
        f.write('{"index": 99, "predic')  # a write cut short by the kill
    fail, asked[:] = False, []
    results = run_vqa(items, ask, tmp_path / "out", parallel=2)
    assert sorted(asked) == sorted(it.prompt for it in items if it.index not in first)
    indices = [json.loads(line)["index"] for line in answers.read_text().splitlines()]
    assert sorted(indices) == list(range(6))
    assert results["metrics"]["vanilla"] == 50.0  # "A" is right for the odd indices
    asked[:] = []
    assert run_vqa(items, ask, tmp_path / "out")["metrics"] == results["metrics"] and asked == []
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in samples] == [i % 2 == 1 for i in range(6)]


def test_image_data_url_round_trips():
    url = image_data_url(_png())
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == _png()
    assert image_data_url(Image.new("RGB", (4, 4))).startswith("data:image/png;base64,")


def test_end_to_end_against_the_real_server(tmp_path):
    """A 3-question POPE file through tools/bench_server.ServerProcess on the tiny random checkpoint: only the
    shape of the outputs is checked (random weights give random text)."""
    pytest.importorskip("openai")
    from evaluation.benchmarks.vis_und import openai_ask_fn
    from tests.model_fixtures import make_checkpoint
    from tools.bench_server import ServerProcess

    ckpt = make_checkpoint(tmp_path / "ckpt", "shapes")
    rows = [[i, base64.b64encode(_png(colour)).decode(), f"Is there a {name} square in the image?", ans, split]
            for i, (colour, name, ans, split) in enumerate([((255, 0, 0), "red", "yes", "random"),
                                                              ((0, 0, 255), "red", "no", "popular"),
                                                              ((0, 255, 0), "green", "yes", "adversarial")])]
    items = load_tsv(_write_tsv(tmp_path / "POPE.tsv", ["index", "image", "question", "answer", "category"], rows),
                     "pope")
    with ServerProcess(ckpt, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, threads=1,
                       served_model_name="tiny") as server:
        results = run_vqa(items, openai_ask_fn(server.url, "tiny", max_tokens=8), tmp_path / "out", parallel=3,
                          settings={"server": server.url})
    answers = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["index"] for a in answers) == [0, 1, 2] and all(isinstance(a["prediction"], str) for a in answers)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results)) and on_disk["settings"]["server"] == server.url
    m = on_disk["metrics"]
    assert set(m["splits"]) == {"random", "popular", "adversarial"} and m["overall"]["questions"] == 3
    assert 0 <= m["overall"]["accuracy"] <= 100 and 0 <= m["unreadable"] <= 3
