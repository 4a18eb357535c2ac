// Live worklist: re-read the rows every 3 s and swap them in when they changed.
// The rows come from the server already escaped; no framework, no build step.
"use strict";
(function () {
  const body = document.getElementById("worklist-rows");
  if (!body || !body.dataset.live) {
    return;
  }
  const url = body.dataset.live;
  let last = body.innerHTML;
  async function refresh() {
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (response.redirected || !response.ok) {
        return; // logged out or a server error: keep what is shown
      }
      const html = await response.text();
      if (html !== last) {
        body.innerHTML = html;
        last = html;
      }
    } catch (error) {
      // network blip: try again on the next tick
    }
  }
  setInterval(refresh, 3000);
})();

// Study page: the regions drawn over an image can be hidden to see the pixels under them,
// and pointing at a finding in the regions list highlights its shapes. The shapes are drawn
// by the server in the source image's pixel coordinates (the SVG's viewBox): nothing is
// computed here.
(function () {
  document.querySelectorAll(".regions-toggle input").forEach(function (box) {
    box.addEventListener("change", function () {
      box.closest("figure").classList.toggle("regions-hidden", !box.checked);
    });
  });
  document.querySelectorAll("#regions tr[data-finding]").forEach(function (row) {
    function highlight(on) {
      document.querySelectorAll("svg.regions g.region").forEach(function (shape) {
        if (shape.dataset.finding === row.dataset.finding) {
          shape.classList.toggle("highlight", on);
        }
      });
    }
    row.addEventListener("mouseenter", function () { highlight(true); });
    row.addEventListener("mouseleave", function () { highlight(false); });
  });
})();
