// Charts take the page's colours (light or dark, as the system is set), read from the CSS
// variables of dashboard.css: Chart.js's own defaults are dark grey on transparent.
(function () {
  "use strict";
  if (!window.Chart) return;
  const style = getComputedStyle(document.documentElement);
  const fg = style.getPropertyValue("--fg").trim();
  const line = style.getPropertyValue("--line").trim();
  if (fg) window.Chart.defaults.color = fg;
  if (line) window.Chart.defaults.borderColor = line;
})();
