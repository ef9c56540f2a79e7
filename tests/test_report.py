"""The HTML report: one self-contained file (inline PNGs, no external reference, no script)
whose rows show exactly the result's queries, proponents and opponents, with escaped text;
`fastinf topk --html` writes it, and refuses a bad path before any work."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import fastinf.imaging
import fastinf.report
from fastinf.cli import main
from fastinf.config import CurvatureConfig
from fastinf.demo import attribution_grid
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine
from fastinf.imaging import data_uri, png_bytes, to_pil
from fastinf.models import save_unet
from fastinf.report import format_score, render_report, write_report

from tiny import SMALL_SCORE, TinyConvEps, random_dataset, run_cli, tiny_unet, undocumented

PNG_PREFIX = "data:image/png;base64,"
SHAPE = (3, 7, 5)  # RGB, and height ≠ width so that a swapped size fails
K = 4


class Page(HTMLParser):
    """Every start tag with its attributes, the text inside each <figure>, all text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.figures: list[dict] = []
        self.style = ""
        self.text: list[str] = []
        self._open: list[tuple[str, str]] = []  # (tag, class) of each open element
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "figure":
            strips = [c.split()[1] for t, c in self._open if c.startswith("strip ")]
            self.figures.append({"class": attributes.get("class"), "imgs": [], "text": []})
            self.figures[-1]["strip"] = strips[-1] if strips else None
        if tag == "img" and self._inside("figure"):
            self.figures[-1]["imgs"].append(attributes)
        if tag not in ("img", "br", "meta"):
            self._open.append((tag, attributes.get("class") or ""))

    def _inside(self, tag: str) -> bool:
        return any(open_tag == tag for open_tag, _ in self._open)

    def handle_endtag(self, tag):
        assert self._open and self._open[-1][0] == tag, (tag, self._open)
        self._open.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._open and self._open[-1][0] == "style":
            self.style += data
        if self._inside("figure"):
            self.figures[-1]["text"].append(data)


@pytest.fixture(scope="module")
def scored():
    """A real result: a tiny convolutional model, 9 RGB training images, 3 queries."""
    torch.manual_seed(0)
    model = TinyConvEps(sample_shape=SHAPE).double()
    data = random_dataset(9, SHAPE, seed=1)
    queries = random_dataset(3, SHAPE, seed=7).images
    engine = InfluenceEngine(model, NoiseSchedule.linear(100, 1e-3, 0.2), data, config=SMALL_SCORE)
    engine.fit(CurvatureConfig(strategy="identity"))
    return queries, engine.score(queries, k=K), data


def decode(src: str) -> Image.Image:
    assert src.startswith(PNG_PREFIX), src[:40]
    png = base64.b64decode(src.removeprefix(PNG_PREFIX), validate=True)
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG"
    return picture


def shown(page: Page, strip: str) -> list[dict]:
    return [figure for figure in page.figures if figure["strip"] == strip]


# -- imaging --------------------------------------------------------------------------------
def test_the_imaging_api_is_pinned_and_documented():
    assert sorted(fastinf.imaging.__all__) == ["data_uri", "png_bytes", "to_pil"]
    assert sorted(fastinf.report.__all__) == [
        "THUMBNAIL_PX",
        "format_score",
        "render_report",
        "write_report",
    ]
    assert undocumented(fastinf.imaging) == [] and undocumented(fastinf.report) == []


def test_to_pil_maps_the_model_range_to_pixels_and_upscales_by_nearest_neighbour():
    image = torch.tensor([[[-1.0, 0.0, 1.0], [-3.0, 0.5, 3.0]]])  # [1, 2, 3]
    picture = to_pil(image, scale=2)
    assert picture.mode == "L" and picture.size == (6, 4)
    expected = [[0, 128, 255], [0, 191, 255]]  # clamped; round(127.5)=128, round(191.25)=191
    assert [[picture.getpixel((2 * x + 1, 2 * y)) for x in range(3)] for y in range(2)] == expected
    rgb = to_pil(torch.stack([torch.full((2, 3), value) for value in (-1.0, 0.0, 1.0)]))
    assert rgb.mode == "RGB" and rgb.size == (3, 2) and rgb.getpixel((1, 1)) == (0, 128, 255)
    png = png_bytes(image, scale=3)
    assert Image.open(io.BytesIO(png)).size == (9, 6)
    assert base64.b64decode(data_uri(png).removeprefix(PNG_PREFIX)) == png
    with pytest.raises(ValueError, match=r"\[1 or 3, H, W\].*\(4, 8, 8\)"):
        to_pil(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="scale=0"):
        to_pil(image, scale=0)


def test_the_demo_grid_draws_with_to_pil(scored):
    queries, result, data = scored
    grid = attribution_grid(queries, data.images, result, columns=K, scale=2)
    index = int(result.proponents.indices[1, 0])
    cell = (5 * 2 + 4) + 2 * 4  # a cell, then the gap before the proponents
    top = 18 + (7 * 2 + 4)  # the header, then the first row
    patch = grid.crop((cell, top, cell + 10, top + 14))
    assert patch.tobytes() == to_pil(data.images[index], 2).tobytes()


# -- the page -------------------------------------------------------------------------------
def test_every_query_proponent_and_opponent_is_an_inline_png_of_the_right_size(scored):
    queries, result, data = scored
    page = Page(render_report(queries, result, data, title="t", scale=3))
    images = [attributes for tag, attributes in page.tags if tag == "img"]
    assert len(images) == queries.shape[0] * (1 + 2 * K)
    for attributes in images:
        assert decode(attributes["src"]).size == (5 * 3, 7 * 3)
        assert (attributes["width"], attributes["height"]) == ("15", "21")
    # By default the longer side is scaled to at most THUMBNAIL_PX: 64 // 7 = 9.
    default = Page(render_report(queries, result, data, title="t"))
    first = next(attributes for tag, attributes in default.tags if tag == "img")
    assert decode(first["src"]).size == (5 * 9, 7 * 9)


def test_the_pictures_are_the_result_s_training_images(scored):
    queries, result, data = scored
    page = Page(render_report(queries, result, data, title="t", scale=1))
    query_figures = [figure for figure in page.figures if figure["class"] == "query"]
    assert len(query_figures) == queries.shape[0]
    for row, figure in enumerate(query_figures):
        assert decode(figure["imgs"][0]["src"]).tobytes() == to_pil(queries[row]).tobytes()
    for strip, topk in (("proponents", result.proponents), ("opponents", result.opponents)):
        figures = shown(page, strip)
        assert len(figures) == queries.shape[0] * K
        for figure, index in zip(figures, topk.indices.flatten().tolist(), strict=True):
            picture = decode(figure["imgs"][0]["src"])
            assert picture.tobytes() == to_pil(data.images[index]).tobytes()


def test_captions_carry_the_indices_scores_and_exactness_of_the_result(scored):
    queries, result, data = scored
    # An index answer: some scores are estimates. A pattern that is neither all nor none.
    exact = torch.arange(queries.shape[0] * K).reshape(-1, K) % 3 != 1
    mixed = dataclasses.replace(
        result, proponents=dataclasses.replace(result.proponents, exact=exact)
    )
    page = Page(render_report(queries, mixed, data, title="t"))
    for strip, topk, marks in (
        ("proponents", result.proponents, exact),
        ("opponents", result.opponents, torch.ones_like(exact)),  # exact=None: all exact
    ):
        figures = shown(page, strip)
        captions = [[text.strip() for text in figure["text"]] for figure in figures]
        assert [caption[0] for caption in captions] == [
            f"#{index}" for index in topk.indices.flatten().tolist()
        ]
        assert [caption[1] for caption in captions] == [
            format_score(score) for score in topk.scores.flatten().tolist()
        ]
        assert [caption[2] for caption in captions] == [
            "exact" if mark else "index estimate" for mark in marks.flatten().tolist()
        ]
    assert "index estimate" in "".join(page.text).split("query 0")[0]  # explained in the note
    plain = Page(render_report(queries, result, data, title="t"))
    assert "index estimate" not in "".join(plain.text)


def test_scores_are_compact_and_signed():
    assert format_score(0.0123456) == "+0.0123"
    assert format_score(-4.5678e-05) == "-4.57e-05"
    assert format_score(1234.5) == "+1.23e+03"


def test_a_missing_entry_is_an_empty_cell(scored):
    queries, result, data = scored
    indices = result.opponents.indices.clone()
    indices[0, -1] = -1
    short = dataclasses.replace(
        result, opponents=dataclasses.replace(result.opponents, indices=indices)
    )
    page = Page(render_report(queries, short, data, title="t"))
    assert sum(tag == "img" for tag, _ in page.tags) == queries.shape[0] * (1 + 2 * K) - 1
    assert [f["class"] for f in shown(page, "opponents")].count("missing") == 1


def test_nothing_is_fetched_from_anywhere_and_nothing_runs(scored):
    queries, result, data = scored
    text = render_report(queries, result, data, title="t", details={"model": "m"})
    page = Page(text)
    assert all(tag not in ("script", "link", "iframe", "object", "embed") for tag, _ in page.tags)
    for tag, attributes in page.tags:
        for name, value in attributes.items():
            assert not name.startswith("on"), (tag, name)
            if tag == "img" and name == "src":
                decode(value)  # a PNG inlined in full: strict base64, nothing else
                continue
            for external in ("http:", "https:", "//", "url(", "javascript:"):
                assert external not in (value or ""), (tag, name, value)
    assert "url(" not in page.style and "@import" not in page.style and page.style.strip()


def test_every_text_is_escaped(scored):
    queries, result, data = scored
    title = "<script>alert('x')</script> & <b>co</b>"
    details = {"<i>key</i>": "<img src=x onerror=alert(1)>", "timings": {"score_s": 0.123456}}
    text = render_report(queries, result, data, title=title, details=details)
    assert "<script" not in text and "<b>" not in text and "<i>" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;co&lt;/b&gt;" in text
    page = Page(text)
    assert {tag for tag, _ in page.tags} <= {
        "html", "head", "meta", "title", "style", "body", "h1", "table", "tr", "th", "td",
        "p", "section", "figure", "img", "figcaption", "br", "div", "span",
    }  # fmt: skip
    assert title in page.text and "<img src=x onerror=alert(1)>" in page.text
    assert "<i>key</i>" in page.text and "score_s 0.123" in page.text


def test_training_images_may_come_as_a_dataset_a_callable_or_a_tensor(scored, tmp_path):
    queries, result, data = scored
    texts = {
        render_report(queries, result, source, title="t")
        for source in (data, data.images, lambda index: data.images[index])
    }
    assert len(texts) == 1
    path = write_report(tmp_path / "r.html", queries, result, data, title="t")
    assert path.read_text(encoding="utf-8") == texts.pop()
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left


def test_queries_that_do_not_match_the_result_are_refused(scored):
    queries, result, data = scored
    with pytest.raises(ValueError, match=r"\(2, 3, 7, 5\) do not match a result of 3"):
        render_report(queries[:2], result, data, title="t")


# -- the command line -----------------------------------------------------------------------
SCHEDULE = {"beta_schedule": "linear", "num_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}


def test_topk_html_writes_the_gallery_of_the_json_it_writes(tmp_path, capsys):
    save_unet(tiny_unet().float(), tmp_path / "unet.safetensors", {"schedule": SCHEDULE})
    data = random_dataset(6, (1, 4, 4), seed=2, dtype=torch.float32)
    save_file({"images": data.images}, str(tmp_path / "train.safetensors"))
    queries = random_dataset(2, (1, 4, 4), seed=3, dtype=torch.float32).images
    save_file({"images": queries}, str(tmp_path / "queries.safetensors"))
    model = ["--weights", str(tmp_path / "unet.safetensors")]
    model += ["--data", str(tmp_path / "train.safetensors")]
    fit = ["fit", *model, "--out", str(tmp_path / "curv"), "--factor-draws", "1"]
    assert main([*fit, "--eigval-draws", "1"]) == 0
    topk = ["topk", *model, "--curvature", str(tmp_path / "curv"), "--k", "3"]
    topk += ["--queries", str(tmp_path / "queries.safetensors"), "--train-draws", "2"]
    topk += ["--query-draws", "2", "--out", str(tmp_path / "top.json")]
    assert main([*topk, "--html", str(tmp_path / "report.html")]) == 0
    assert f"HTML report in {tmp_path / 'report.html'}" in capsys.readouterr().out
    written = json.loads((tmp_path / "top.json").read_text())
    page = Page((tmp_path / "report.html").read_text(encoding="utf-8"))
    assert sum(tag == "img" for tag, _ in page.tags) == 2 * (1 + 2 * 3)
    for strip in ("proponents", "opponents"):
        captions = [figure["text"][0].strip() for figure in shown(page, strip)]
        assert captions == [f"#{index}" for row in written[strip]["indices"] for index in row]
    assert "curv" in "".join(page.text) and "6 images" in "".join(page.text)


@pytest.mark.parametrize(
    ("html", "message"),
    [
        ("report.txt", "--html {}: name a .html or .htm file, e.g. --html report.html."),
        ("folder.html", "--html {} is a folder; name a file to write."),
        ("top.html", "--html {} is also --out; give the JSON and the report two names."),
    ],
)
def test_a_bad_html_path_is_refused_in_one_line_before_any_work(tmp_path, html, message):
    (tmp_path / "curvature").mkdir()
    (tmp_path / "curvature" / "curvature.json").write_text("{}")
    (tmp_path / "folder.html").mkdir()
    path = str(tmp_path / html)
    args = ["topk", "--curvature", str(tmp_path / "curvature"), "--generate", "2"]
    args += ["--out", str(tmp_path / "top.html"), "--html", path]
    code, error, loaded = run_cli(*args)
    assert code == 2 and error.splitlines() == [f"fastinf topk: error: {message.format(path)}"]
    assert loaded == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curvature", "folder.html"]
