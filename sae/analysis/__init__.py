"""Analysis of trained SAEs: latent statistics and examples (`features`), steering (`steering`),
static HTML dashboards (`dashboard`). Circuits, evals and auto-interpretation live beside them."""
