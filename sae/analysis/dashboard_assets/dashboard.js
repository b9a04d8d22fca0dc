// Static SAE dashboard: no server. index_data.js and data/chunk_NNNNN.js are <script>s calling the
// functions below (file:// pages may not fetch() JSON, but they may load scripts).
"use strict";
const SAE_DASHBOARD = (() => {
  let index = null;             // {meta, columns, rows: [[latent, density, max, mean, score, explanation, tokens, logits, chunk], ...]}
  const chunks = {};            // chunk number -> {latents: {id: record}, strings: [...]}
  const PAGE = 200;             // index rows rendered at a time: thousands of latents stay responsive

  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  };
  const fmt = (x, digits = 3) => (x === null || x === undefined) ? "" : Number(x).toPrecision(digits);
  const visible = (s) => s.replace(/\n/g, "↵").replace(/\t/g, "→");
  const row = (r) => Object.fromEntries(index.columns.map((c, i) => [c, r[i]]));

  // --- index page -------------------------------------------------------------------------------
  function renderIndex() {
    const params = new URLSearchParams(location.hash.slice(1));
    const search = document.getElementById("search");
    const state = { query: params.get("q") || "", key: params.get("sort") || "density", ascending: params.get("asc") === "1", shown: PAGE };
    search.value = state.query;
    if (index.meta.score_name) document.querySelector('th[data-key="score"]').textContent = index.meta.score_name;
    document.getElementById("title").textContent = index.meta.title;
    document.getElementById("summary").textContent =
      `${index.rows.length} latents of ${index.meta.d_sae} · ${index.meta.hookpoint} · ${index.meta.model} · ` +
      `${index.meta.tokens.toLocaleString()} tokens from ${index.meta.source}`;
    const draw = () => {
      const q = state.query.toLowerCase();
      const rows = index.rows.map(row).filter((r) => !q || String(r.latent) === q ||
        (r.explanation || "").toLowerCase().includes(q) || r.tokens.join(" ").toLowerCase().includes(q) ||
        r.logits.join(" ").toLowerCase().includes(q));
      const sign = state.ascending ? 1 : -1;
      rows.sort((a, b) => {
        const x = a[state.key], y = b[state.key];
        if (x === y) return a.latent - b.latent;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * sign;
      });
      const body = document.querySelector("#latents tbody");
      body.replaceChildren(...rows.slice(0, state.shown).map((r) => el("tr", {},
        el("td", {}, el("a", { href: `latent.html#${r.latent}`, text: r.latent })),
        el("td", { class: "num", text: fmt(r.density) }), el("td", { class: "num", text: fmt(r.max) }),
        el("td", { class: "num", text: fmt(r.mean) }), el("td", { class: "num", text: fmt(r.score) }),
        el("td", { text: r.explanation || "" }), el("td", { text: r.tokens.map(visible).join(" · ") }),
        el("td", { text: r.logits.map(visible).join(" · ") }))));
      const more = document.getElementById("more");
      more.hidden = rows.length <= state.shown;
      more.textContent = `show more (${rows.length - state.shown} hidden)`;
      document.querySelectorAll("th[data-key]").forEach((th) => {
        th.classList.toggle("sorted", th.dataset.key === state.key);
        th.classList.toggle("ascending", th.dataset.key === state.key && state.ascending);
      });
    };
    search.addEventListener("input", () => { state.query = search.value; state.shown = PAGE; draw(); });
    document.querySelectorAll("th[data-key]").forEach((th) => th.addEventListener("click", () => {
      state.ascending = state.key === th.dataset.key ? !state.ascending : th.dataset.key === "latent";
      state.key = th.dataset.key; draw();
    }));
    document.getElementById("more").addEventListener("click", () => { state.shown += PAGE; draw(); });
    draw();
  }

  // --- latent page ------------------------------------------------------------------------------
  function renderLatentFromHash() {
    const main = document.getElementById("latent");
    const latent = parseInt(location.hash.slice(1), 10);
    const position = index.rows.findIndex((r) => r[0] === latent);
    if (Number.isNaN(latent) || position < 0) {
      main.replaceChildren(el("p", { class: "error", text: `latent ${location.hash.slice(1)} is not in this dashboard` }));
      return;
    }
    const previous = index.rows[(position - 1 + index.rows.length) % index.rows.length][0];
    const next = index.rows[(position + 1) % index.rows.length][0];
    document.getElementById("prev").href = `#${previous}`;
    document.getElementById("next").href = `#${next}`;
    const chunk = row(index.rows[position]).chunk;
    if (chunks[chunk]) { drawLatent(main, chunks[chunk], latent); return; }
    const script = el("script", { src: `data/chunk_${String(chunk).padStart(5, "0")}.js` });
    script.onload = () => drawLatent(main, chunks[chunk], latent);
    script.onerror = () => main.replaceChildren(el("p", { class: "error", text: `cannot load ${script.src}` }));
    document.body.append(script);
  }

  function drawLatent(main, chunk, latent) {
    const d = chunk.latents[latent];
    const strings = chunk.strings;
    document.title = `latent ${latent}`;
    const parts = [el("h1", { text: `Latent ${latent}` })];
    if (d.explanation) parts.push(el("p", { class: "explanation", text: d.explanation }));
    if (d.scores) parts.push(el("p", { text: Object.entries(d.scores).map(([k, v]) => `${k}: ${fmt(v)}`).join(" · ") }));
    parts.push(el("p", { text: `fires on ${fmt(100 * d.density)}% of ${index.meta.tokens.toLocaleString()} tokens · ` +
      `max ${fmt(d.max)} · mean when firing ${fmt(d.mean_firing)}` }));
    const columns = el("div", { class: "columns" }, histogram(d.histogram));
    if (d.logits) columns.append(logitTable("Top logits (promoted)", d.logits.top, "positive"),
      logitTable("Bottom logits (suppressed)", d.logits.bottom, "negative"));
    else parts.push(el("p", { text: `logit effects: ${index.meta.logit_effects}` }));
    parts.push(columns, el("h2", { text: "Top activations" }), ...d.top.map((e) => example(e, strings, d.max)));
    for (const q of d.quantiles) {
      parts.push(el("h2", { text: `${q.label} (activation ${fmt(q.low)} – ${fmt(q.high)})` }),
        ...q.examples.map((e) => example(e, strings, d.max)));
    }
    if (d.steering && d.steering.length) parts.push(el("h2", { text: "Steering" }), steeringTable(d.steering));
    main.replaceChildren(...parts);
  }

  // One context window: [value, tokenStringIndices, acts, center]; background opacity = act / latent max.
  function example([value, tokens, acts, center], strings, max) {
    const line = el("div", { class: "example" }, el("span", { class: "value", text: fmt(value) }));
    tokens.forEach((t, i) => {
      if (t < 0) return;
      const text = visible(strings[t]);
      const alpha = max > 0 ? Math.min(1, acts[i] / max) : 0;
      const span = el("span", { class: "tok" + (i === center ? " center" : ""), "data-tip": `${JSON.stringify(strings[t])}  ${fmt(acts[i])}`, "data-act": acts[i], text });
      if (acts[i] > 0) span.style.background = `rgba(255, 120, 0, ${0.15 + 0.85 * alpha})`;
      line.append(span);
    });
    return line;
  }

  function histogram(h) {
    const box = el("div", {}, el("h2", { text: "Activation density (non-zero activations, log-spaced bins)" }));
    if (!h || !h.counts.length) { box.append(el("p", { text: "never fired" })); return box; }
    const width = 420, height = 140, n = h.counts.length, top = Math.max(...h.counts);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", width); svg.setAttribute("height", height + 20);
    h.counts.forEach((c, i) => {
      const bar = document.createElementNS(ns, "rect");
      const barHeight = (c / top) * height;
      bar.setAttribute("x", (i * width) / n); bar.setAttribute("width", Math.max(1, width / n - 1));
      bar.setAttribute("y", height - barHeight); bar.setAttribute("height", barHeight); bar.setAttribute("fill", "#3a6ea5");
      const title = document.createElementNS(ns, "title");
      title.textContent = `${fmt(h.edges[i])} – ${fmt(h.edges[i + 1])}: ${c}`;
      bar.append(title); svg.append(bar);
    });
    for (const [x, anchor, text] of [[0, "start", fmt(h.edges[0])], [width, "end", fmt(h.edges[n])]]) {
      const label = document.createElementNS(ns, "text");
      label.setAttribute("x", x); label.setAttribute("y", height + 15); label.setAttribute("text-anchor", anchor);
      label.setAttribute("font-size", "11"); label.textContent = text; svg.append(label);
    }
    box.append(svg);
    return box;
  }

  function logitTable(title, entries, cls) {
    return el("div", {}, el("h2", { text: title }), el("table", { class: "logits" },
      ...entries.map(([token, value]) => el("tr", {}, el("td", { text: visible(token) }), el("td", { class: `num ${cls}`, text: fmt(value) })))));
  }

  function steeringTable(examples) {
    const columns = ["prompt", "steered", "unsteered completion", "steered completion", "KL",
      "latent act. on text", "perplexity (clean model)", "p(top logit tokens)", "concept score"];
    const arrow = (a, b) => (a === null || a === undefined) ? "" : `${fmt(a)} → ${fmt(b)}`;
    const how = (s) => {
      const latents = s.latents && s.latents.length > 1 ? `latents ${s.latents.join(", ")}: ` : "";
      return latents + `${s.mode} ${s.alpha === null ? fmt(s.strength) : "α=" + fmt(s.alpha)}`;
    };
    return el("table", { class: "steer" }, el("tr", {}, ...columns.map((h) => el("th", { text: h }))),
      ...examples.map((s) => el("tr", {},
        el("td", { text: s.prompt }), el("td", { text: how(s) }),
        el("td", { class: "completion", text: s.unsteered.text }), el("td", { class: "completion", text: s.steered.text }),
        el("td", { class: "num", text: fmt(s.next_token_kl) }),
        el("td", { class: "num", text: arrow(s.unsteered.latent_activation_mean, s.steered.latent_activation_mean) }),
        el("td", { class: "num", text: arrow(s.unsteered.perplexity, s.steered.perplexity) }),
        el("td", { class: "num", text: arrow(s.top_logit_prob_clean, s.top_logit_prob_steered) }),
        el("td", { class: "num", text: arrow(s.unsteered.concept_score, s.steered.concept_score) }))));
  }

  return {
    index: (data) => { index = data; },
    chunk: (number, data) => { chunks[number] = data; },
    renderIndex, renderLatentFromHash,
  };
})();
