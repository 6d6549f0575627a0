"""The report pieces without Ray: HTML structure, CSV/JSON, figures and video frames."""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest

from rayrm.evaluate.curves import CURVE_KINDS
from rayrm.evaluate.figures import episode_figure, save_episode_png, summary_figure, video_frames
from rayrm.evaluate.html import write_report
from rayrm.evaluate.report import all_metrics, write_csv, write_json
from rayrm.video import count_mp4_frames, write_mp4

NAMES = ["reach", "grasp", "move", "place"]


def _rows(sarm: bool = True) -> dict[str, list]:
    """Three sequences: a success, a failure that reached 3 of 4 stages, a rewound success."""
    success = np.linspace(0.1, 1.0, 12)
    failure = np.r_[np.linspace(0.1, 0.6, 8), np.full(4, 0.6)]
    rewound = np.r_[np.linspace(0.1, 0.8, 9), np.linspace(0.7, 0.5, 3)]
    stages = np.repeat([0, 1, 2, 3], 3)
    rows = {
        "episode_id": ["a", "b", "a~rewound"],
        "source_episode": ["a", "b", "a"],
        "kind": ["episode", "episode", "rewound"],
        "source_file": ["", "", ""],
        "success": [True, False, None],
        "num_frames": [12, 12, 12],
        "frame_index": [list(range(12)), list(range(12)), [*range(9), 7, 6, 5]],
        "turn": [-1, -1, 8],
        "stage_boundaries": [[3, 6, 9], [3, 6], [3, 6, 9]],
        "true_progress": [(np.arange(12) + 1) / 12, [], (np.r_[np.arange(9), 7, 6, 5] + 1) / 12],
        "true_stage": [stages, [], stages[[*range(9), 7, 6, 5]]],
        "true_stage_progress": [(np.arange(12) + 1) / 12, [], np.zeros(12)],
    }
    for kind in CURVE_KINDS:
        rows[kind] = [success, failure, rewound]
    predicted = [stages, np.minimum(stages, 2), stages] if sarm else [[], [], []]
    rows["stage_pred"] = rows["causal_stage_pred"] = predicted
    return rows


def test_metrics_of_hand_made_curves():
    found = all_metrics(_rows(), num_stages=4, sarm=True)
    for kind in CURVE_KINDS:
        m = found[kind]
        assert m["voc_expert"] == pytest.approx(1.0)
        assert m["auroc_success_vs_failure"] == 1.0  # 1.0 final vs 0.6
        assert m["num_success_group"] == 1 and m["num_partial_group"] == 1
        assert m["rank_final_ordered"] is True and m["rank_final_pair_accuracy"] == 1.0
        assert m["rewind_fall_rate"] == 1.0 and m["rewind_voc_after_turn"] == pytest.approx(-1)
        assert m["stage_accuracy"] == 1.0  # only the success is labelled
        assert m["mse_expert"] == pytest.approx(
            np.mean((np.linspace(0.1, 1, 12) - (np.arange(12) + 1) / 12) ** 2)
        )
    assert "stage_accuracy" not in all_metrics(_rows(False), 4, sarm=False)["prefix"]


def test_json_and_csv(tmp_path):
    found = all_metrics(_rows(), 4, True)
    found["prefix"]["voc_failure"] = float("nan")
    write_json(str(tmp_path / "m.json"), {"curves": found, "x": np.float32(0.5)})
    data = json.load(open(tmp_path / "m.json"))  # strict JSON: NaN became null
    assert data["curves"]["prefix"]["voc_failure"] is None and data["x"] == 0.5
    write_csv(str(tmp_path / "m.csv"), {"model": found, "blind": found})
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert len(rows) == 2 * len(CURVE_KINDS) * len(found["prefix"])
    voc = [
        r
        for r in rows
        if r["model"] == "model" and r["curve"] == "chained" and r["metric"] == "voc_expert"
    ]
    assert math.isclose(float(voc[0]["value"]), 1.0)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _page(tmp_path, embed_mb: float):
    rows = _rows()
    found = all_metrics(rows, 4, True)
    png = str(tmp_path / "episodes" / "a.png")
    save_episode_png(png, {k: v[0] for k, v in rows.items()}, None, NAMES, 4)
    summary = str(tmp_path / "summary.png")
    summary_figure(summary, rows, rows, found, found, ["success", "partial"], "t")
    video = str(tmp_path / "videos" / "a.mp4")
    write_mp4(video, (np.full((16, 16, 3), i * 10, np.uint8) for i in range(5)))
    cards = [{"episode_id": "a", "png": png, "video": video, "group": "success"}]
    path = write_report(
        str(tmp_path / "report.html"),
        "title <x>",
        {"checkpoint": "c"},
        found,
        found,
        summary,
        cards,
        embed_mb,
    )
    parser = _Tags()
    parser.feed(open(path).read())
    return open(path).read(), parser.tags


def test_report_is_self_contained(tmp_path):
    page, tags = _page(tmp_path, embed_mb=10)
    images = [a["src"] for t, a in tags if t == "img"]
    assert len(images) == 2 and all(s.startswith("data:image/png;base64,") for s in images)
    videos = [a["src"] for t, a in tags if t == "video"]
    assert len(videos) == 1 and videos[0].startswith("data:video/mp4;base64,")
    assert "title &lt;x&gt;" in page  # escaped
    headers = page.split("<table class='metrics'>")[1].split("</tr>")[0]
    assert headers.count("<th>") == 1 + 2 * len(CURVE_KINDS)
    # over the size limit, videos are linked relative to the report
    _, tags = _page(tmp_path, embed_mb=0)
    assert [a["src"] for t, a in tags if t == "video"] == ["videos/a.mp4"]


def test_episode_figure_and_video_frames():
    rows = _rows()
    row = {k: v[2] for k, v in rows.items()}
    fig, ax, hidden = episode_figure(row, None, NAMES, 4)
    assert len(fig.axes) == 2  # curves, predicted-stage strip
    assert len(hidden) >= 4  # chained, prefix, causal, stage strip (+ stage names on it)
    frames = np.zeros((12, 16, 16, 3), np.uint8)
    images = list(video_frames(frames, row, None, NAMES, 4, height=120))
    assert len(images) == 12 and images[0].shape == (120, 112 + 240, 3)
    # the curve grows: later frames show more of it (differ more from the empty panel)
    assert np.abs(images[-1].astype(int) - images[0]).sum() > 0


def test_mp4_decodes_to_the_frame_count(tmp_path):
    path = str(tmp_path / "odd.mp4")
    frames = [np.full((15, 21, 3), i, np.uint8) for i in range(7)]  # odd sides get padded
    assert write_mp4(path, frames, fps=5) == 7
    assert count_mp4_frames(path) == 7
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(str(tmp_path / "none.mp4"), [])


def test_auroc_per_failure_mode_by_hand():
    """Two successes (final 0.9, 0.5); wrong-target failures end high (0.8, 0.95), stalls low
    (0.1, 0.2). Pooled AUROC 5/8 hides that wrong targets are ranked above successes."""
    finals = {"s1": 0.9, "s2": 0.5, "w1": 0.8, "w2": 0.95, "t1": 0.1, "t2": 0.2}
    modes = {"s1": None, "s2": None, "w1": "wrong_target", "w2": "wrong_target"}
    rows = {
        "kind": ["episode"] * 6,
        "success": [e.startswith("s") for e in finals],
        "failure_mode": [modes.get(e, "stall") for e in finals],
        "stage_boundaries": [[3, 6, 9]] * 6,
        "true_progress": [[0.5, 1.0] if e.startswith("s") else [] for e in finals],
        "turn": [-1] * 6,
    }
    for kind in CURVE_KINDS:
        rows[kind] = [[0.0, value] for value in finals.values()]
    found = all_metrics(rows, num_stages=4, sarm=False)["prefix"]
    assert found["auroc_success_vs_failure"] == pytest.approx(5 / 8)
    assert found["auroc_vs_stall"] == 1.0
    assert found["auroc_vs_wrong_target"] == pytest.approx(1 / 4)  # only 0.9 > 0.8 of 4 pairs
    assert found["num_failure_wrong_target"] == 2 and found["num_failure_stall"] == 2
