// Typesets the math on every page (pymdownx.arithmatex, generic mode: \( \) and \[ \]) with the
// KaTeX shipped in docs/assets/katex; document$ re-runs it after mkdocs-material's instant loading.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
