"""The feature circuit as one self-contained, offline HTML page (`feature_report.py` writes graph.html).

One row per site (the first site at the bottom, the metric at the top, as attribution graphs are drawn),
one column per token position; a node's size and colour show its effect (blue positive, red negative,
squares are SAE error nodes), an edge's width and colour its weight. Hovering a node fills the fixed
#details panel (site, token, latent, effect, explanation, top prompts, dashboard link) and highlights its
edges; clicking it puts it in the URL. The fragment `#hover=<node id>` (URI-encoded) applies that hover on
load, so a link can point at one node (and a `--dump-dom` test can see a filled panel).

The graph travels as JSON in a <script type="application/json"> tag; "</" and "<!--" are escaped so no
text in it can end the tag, and the script writes every string with textContent, never as HTML.
"""

from __future__ import annotations

import html
import json
import math

_STYLE = """
body{font:13px system-ui,sans-serif;margin:12px;color:#222}h1{font-size:18px;margin:0 0 4px}
.note{color:#555;margin:0 0 8px}svg{display:block}.site,.tok{font-size:11px;fill:#333}
.grid{stroke:#eee}.edge{fill:none}.node{stroke:#333;stroke-width:.7px;cursor:pointer}
svg.focus .edge{opacity:.06}svg.focus .edge.hl{opacity:1}svg.focus .node{opacity:.3}
svg.focus .node.hl{opacity:1}.node.cur{stroke:#000;stroke-width:2.5px}
#details{position:fixed;right:12px;top:12px;width:360px;max-height:90vh;overflow:auto;background:#fff;
border:1px solid #bbb;border-radius:4px;padding:8px 10px;box-shadow:0 2px 8px #0002}
#details:empty{display:none}#details h2{font-size:15px;margin:0 0 6px}#details th{text-align:left;
padding-right:8px;vertical-align:top}#details li{margin:3px 0}.act{font-family:monospace;color:#555}
.ex{white-space:pre-wrap;font-family:monospace}
"""

_SCRIPT = r"""
(function () {
  const G = JSON.parse(document.getElementById('graph-data').textContent);
  const NS = 'http://www.w3.org/2000/svg', svg = document.getElementById('graph');
  const panel = document.getElementById('details');
  const sites = G.sites.slice();
  G.nodes.forEach(n => { if (!sites.includes(n.site)) sites.push(n.site); });
  const nCols = Math.max(G.tokens.length, 1 + Math.max(-1, ...G.nodes.map(n => n.position)));
  const cells = new Map(), byId = new Map();
  G.nodes.forEach(n => {
    byId.set(n.id, n);
    const key = n.site + '\u0000' + n.position;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  });
  const RMAX = 13, rowH = 80, left = 200, top = 70;
  const maxCell = Math.max(1, ...[...cells.values()].map(c => c.length));
  const colW = Math.max(80, maxCell * (2 * RMAX + 4) + 8);
  const width = left + nCols * colW + 20, height = top + sites.length * rowH + 50;
  const maxEffect = Math.max(1e-12, ...G.nodes.map(n => Math.abs(n.effect || 0)));
  const tokLabel = p => p >= 0 && p < G.tokens.length ? JSON.stringify(G.tokens[p]) : '';
  const rowY = i => top + (sites.length - i - 0.5) * rowH;
  cells.forEach(cell => {
    cell.sort((a, b) => (a.latent < 0) - (b.latent < 0) || a.latent - b.latent);
    cell.forEach((n, i) => {
      n.x = left + n.position * colW + (i + 0.5) * colW / cell.length;
      n.y = rowY(sites.indexOf(n.site));
      n.frac = Math.sqrt(Math.abs(n.effect || 0) / maxEffect);
    });
  });
  const metric = {id: 'metric', x: left + nCols * colW / 2, y: 32};
  const point = id => id === 'metric' ? metric : byId.get(id);
  const edges = G.edges.filter(e => point(e.source) && point(e.target));
  const maxWeight = Math.max(1e-12, ...edges.map(e => Math.abs(e.weight)));
  svg.setAttribute('width', width);
  svg.setAttribute('height', height);
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v));
    if (text !== undefined) e.textContent = text;
    return svg.appendChild(e);
  };
  sites.forEach((s, i) => {
    add('line', {class: 'grid', x1: left, x2: width - 20, y1: rowY(i), y2: rowY(i)});
    add('text', {class: 'site', x: left - 8, y: rowY(i) + 4, 'text-anchor': 'end'}, s);
  });
  for (let p = 0; p < nCols; p++) {
    const x = left + p * colW;
    add('line', {class: 'grid', x1: x, x2: x, y1: top, y2: top + sites.length * rowH});
    const tok = tokLabel(p);
    add('text', {class: 'tok', x: x + colW / 2, y: height - 28, 'text-anchor': 'middle'},
        tok.length > 14 ? tok.slice(0, 13) + '\u2026' : tok);
    add('text', {class: 'tok', x: x + colW / 2, y: height - 14, 'text-anchor': 'middle'}, String(p));
  }
  const color = (sign, frac) => `hsl(${sign < 0 ? 0 : 215},70%,${82 - 42 * frac}%)`;
  const edgeEls = edges.map(e => {
    const a = point(e.source), b = point(e.target), f = Math.abs(e.weight) / maxWeight;
    return add('line', {class: 'edge', x1: a.x, y1: a.y, x2: b.x, y2: b.y, 'data-source': e.source,
      'data-target': e.target, stroke: color(e.weight, 0.8), 'stroke-width': 0.5 + 6 * f,
      'stroke-opacity': 0.3 + 0.6 * f});
  });
  const nodeEls = new Map();
  G.nodes.forEach(n => {
    const r = 4 + (RMAX - 4) * n.frac, fill = color(n.effect, n.frac);
    const el = n.latent < 0
      ? add('rect', {x: n.x - r, y: n.y - r, width: 2 * r, height: 2 * r, fill: fill})
      : add('circle', {cx: n.x, cy: n.y, r: r, fill: fill});
    el.setAttribute('class', 'node');
    el.setAttribute('data-id', n.id);
    nodeEls.set(n.id, el);
  });
  const m = add('rect', {class: 'node', 'data-id': 'metric', x: metric.x - 30, y: metric.y - 12,
    width: 60, height: 24, rx: 12, fill: '#f5f5f5'});
  add('text', {x: metric.x, y: metric.y + 4, 'text-anchor': 'middle', 'pointer-events': 'none'}, 'metric');
  nodeEls.set('metric', m);

  function html(tag, text, parent) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  const fmt = v => typeof v === 'number' ? v.toPrecision(4) : 'n/a';
  function fill(id) {
    const n = byId.get(id);
    const ins = edges.filter(e => e.target === id), outs = edges.filter(e => e.source === id);
    panel.replaceChildren();
    const table = html('table');
    const row = (k, v) => { const tr = html('tr', undefined, table); html('th', k, tr); html('td', v, tr); };
    if (!n) {
      html('h2', 'metric', panel);
      panel.appendChild(table);
      row('edges', `${ins.length} incoming`);
      return;
    }
    html('h2', n.latent < 0 ? 'SAE error' : `latent ${n.latent}`, panel);
    panel.appendChild(table);
    row('site', n.site);
    row('position', `${n.position} ${tokLabel(n.position)}`);
    row('latent', n.latent < 0 ? 'SAE error' : String(n.latent));
    row('effect', fmt(n.effect));
    row('edges', `${ins.length} in, ${outs.length} out`);
    if (n.explanation) row('explanation', n.explanation);
    if (n.dashboard && !/^\s*javascript:/i.test(n.dashboard)) {
      const a = html('a', 'latent dashboard', html('p', undefined, panel));
      a.href = n.dashboard;
    }
    if (n.examples && n.examples.length) {
      html('h3', 'Top prompts', panel);
      const ul = html('ul', undefined, panel);
      n.examples.forEach(x => {
        const li = html('li', undefined, ul);
        html('span', fmt(x.activation) + ' ', li).className = 'act';
        html('span', x.text, li).className = 'ex';
      });
    } else html('p', 'no examples', panel);
  }
  function hover(id) {
    if (!nodeEls.has(id)) return;
    svg.classList.add('focus');
    nodeEls.forEach(el => el.classList.remove('hl', 'cur'));
    nodeEls.get(id).classList.add('hl', 'cur');
    edgeEls.forEach((el, i) => {
      const e = edges[i], on = e.source === id || e.target === id;
      el.classList.toggle('hl', on);
      if (on) [e.source, e.target].forEach(k => nodeEls.get(k).classList.add('hl'));
    });
    fill(id);
  }
  function clear() {
    svg.classList.remove('focus');
    nodeEls.forEach(el => el.classList.remove('hl', 'cur'));
    edgeEls.forEach(el => el.classList.remove('hl'));
    panel.replaceChildren();
  }
  nodeEls.forEach((el, id) => {
    el.addEventListener('mouseover', () => hover(id));
    el.addEventListener('click', ev => {
      ev.stopPropagation();
      history.replaceState(null, '', '#hover=' + encodeURIComponent(id));
    });
  });
  svg.addEventListener('click', clear);
  function fromHash() {
    const match = /^#hover=(.*)$/.exec(location.hash);
    if (match) { try { hover(decodeURIComponent(match[1])); } catch (err) { /* a malformed link */ } }
  }
  window.addEventListener('hashchange', fromHash);
  const dropped = G.edges.length - edges.length;
  document.getElementById('summary').textContent = `${G.nodes.length} nodes, ${edges.length} edges` +
    (dropped ? ` (${dropped} edges to nodes not in the graph are not drawn)` : '') +
    '. Hover a node for details; blue: positive effect, red: negative, squares: SAE error nodes.';
  fromHash();
})();
"""


def _finite(value):
    """NaN/inf become null: JSON has no such numbers, and one bad effect should not blank the page."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def graph_html(graph: dict, title: str) -> str:
    """The page for `graph` ({"sites", "tokens", "nodes", "edges"}, as `feature_report._graph` builds it)."""
    data = json.dumps(_finite(graph), allow_nan=False).replace("</", "<\\/").replace("<!--", "\\u003c!--")
    name = html.escape(title)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{name}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>{name}</h1>\n"
        '<p class="note" id="summary"></p>\n<svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg>\n'
        '<div id="details"></div>\n'
        f'<script type="application/json" id="graph-data">{data}</script>\n'
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )
