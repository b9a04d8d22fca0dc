"""The feature-circuit page embeds its graph verbatim (no text can end the data tag) and, in a real headless
Chromium, draws one SVG element per node and per edge, fills the details panel for `#hover=<id>` and
renders a non-blank picture."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from urllib.parse import quote

import numpy as np
import pytest
from test_dashboard import CHROMIUM, run_chromium

from sae.analysis.circuits.graph_html import graph_html

SITES = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_post"]


def sample_graph() -> dict:
    def node(site: int, position: int, latent: int, effect: float, **extra) -> dict:
        return {
            "id": f"{SITES[site]}|{position}|{latent}",
            "site": SITES[site],
            "position": position,
            "latent": latent,
            "effect": effect,
            "examples": extra.get("examples", []),
            "explanation": extra.get("explanation"),
            "dashboard": extra.get("dashboard"),
        }

    nodes = [
        node(
            0,
            1,
            7,
            0.8,
            examples=[
                {"text": "When Mary and John </script><script>alert(1)</script>", "activation": 2.5},
                {"text": "<!--<script> a comment", "activation": 1.0},
            ],
            explanation="names <b>before</b> a verb",
            dashboard="../dash/latent.html#7",
        ),
        node(0, 1, 9, -0.3),
        node(0, 2, -1, 0.1),  # the SAE error node
        node(1, 3, 4, -0.6, explanation="an indirect object"),
    ]
    ids = [n["id"] for n in nodes]
    edges = [
        {"source": ids[0], "target": ids[3], "weight": 0.5},
        {"source": ids[1], "target": ids[3], "weight": -0.2},
        {"source": ids[2], "target": "metric", "weight": 0.05},
        {"source": ids[3], "target": "metric", "weight": -1.0},
    ]
    return {"sites": SITES, "tokens": ["<bos>", "When", " Mary", " and"], "nodes": nodes, "edges": edges}


def embedded_json(page: str) -> str:
    match = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.S)
    assert match, "the data tag is in the page"
    return match.group(1)


def test_page_embeds_the_graph_and_no_text_ends_the_data_tag():
    graph = sample_graph()
    page = graph_html(graph, "ioi <i>circuit</i>")
    data = embedded_json(page)
    assert json.loads(data) == graph, "the first </script> is the tag's own end"
    assert "</" not in data and "<!--" not in data
    assert "<title>ioi &lt;i&gt;circuit&lt;/i&gt;</title>" in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", ""), "nothing is loaded from outside"

    empty = {"sites": SITES, "tokens": [], "nodes": [], "edges": []}
    assert json.loads(embedded_json(graph_html(empty, "empty"))) == empty
    graph["nodes"][0]["effect"] = float("nan")
    assert json.loads(embedded_json(graph_html(graph, "nan")))["nodes"][0]["effect"] is None


class _Elements(HTMLParser):
    """Every element with its attributes, and the text inside #details."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.details_depth = 0
        self.details_text: list[str] = []
        self.details_links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        if attributes.get("id") == "details" or self.details_depth:
            self.details_depth += 1
            if tag == "a":
                self.details_links.append(attributes.get("href", ""))

    def handle_endtag(self, tag):
        if self.details_depth:
            self.details_depth -= 1

    def handle_data(self, data):
        if self.details_depth:
            self.details_text.append(data)


def parse(dom: str) -> _Elements:
    parser = _Elements()
    parser.feed(dom)
    return parser


def console_errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)
def test_graph_draws_nodes_and_edges_and_hover_fills_the_details(tmp_path):
    graph = sample_graph()
    path = tmp_path / "graph.html"
    path.write_text(graph_html(graph, "ioi: feature circuit"))

    plain = run_chromium(f"file://{path}", "--dump-dom")
    assert console_errors(plain) == [], console_errors(plain)
    dom = parse(plain.stdout)
    nodes = [a["data-id"] for _, a in dom.elements if "node" in a.get("class", "").split()]
    assert sorted(nodes) == sorted([n["id"] for n in graph["nodes"]] + ["metric"])
    squares = [t for t, a in dom.elements if a.get("data-id") == graph["nodes"][2]["id"]]
    assert squares == ["rect"], "the SAE error node is a square"
    edges = [(a["data-source"], a["data-target"]) for _, a in dom.elements if a.get("class") == "edge"]
    assert edges == [(e["source"], e["target"]) for e in graph["edges"]]
    assert "".join(dom.details_text).strip() == "", "the panel is there from the start, empty"
    assert not any(t == "script" and a.get("src") for t, a in dom.elements), "the injected tag is text"

    first = graph["nodes"][0]
    hovered = run_chromium(f"file://{path}#hover={quote(first['id'], safe='')}", "--dump-dom")
    assert console_errors(hovered) == [], console_errors(hovered)
    dom = parse(hovered.stdout)
    text = "".join(dom.details_text)
    assert "names <b>before</b> a verb" in text, "the explanation is text, never HTML"
    assert "When Mary and John </script><script>alert(1)</script>" in text and "2.500" in text
    assert first["site"] in text and "latent 7" in text and '"When"' in text
    assert dom.details_links == ["../dash/latent.html#7"]
    highlighted = [a for _, a in dom.elements if a.get("class") == "edge hl"]
    assert [(a["data-source"], a["data-target"]) for a in highlighted] == [
        (first["id"], graph["nodes"][3]["id"])
    ]

    error = run_chromium(f"file://{path}#hover={quote(graph['nodes'][2]['id'], safe='')}", "--dump-dom")
    text = "".join(parse(error.stdout).details_text)
    assert "SAE error" in text and "no examples" in text and not parse(error.stdout).details_links

    empty = tmp_path / "empty.html"
    empty.write_text(graph_html({"sites": SITES, "tokens": ["a"], "nodes": [], "edges": []}, "empty"))
    blank = run_chromium(f"file://{empty}#hover=metric", "--dump-dom")
    assert console_errors(blank) == [] and "0 nodes, 0 edges" in blank.stdout

    screenshot = tmp_path / "graph.png"
    shot = run_chromium(f"file://{path}", f"--screenshot={screenshot}", "--window-size=1200,800")
    assert console_errors(shot) == [] and screenshot.is_file()
    from PIL import Image

    pixels = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3).astype(int)  # [h*w, 3]
    r, g, b = pixels.T
    assert ((r < 240) | (g < 240) | (b < 240)).sum() > 2000, "the page is not blank"
    assert ((b - r > 60) & (b > 150)).sum() > 50, "blue (positive) nodes and edges are drawn"
    assert ((r - b > 60) & (r > 150)).sum() > 50, "red (negative) nodes and edges are drawn"
