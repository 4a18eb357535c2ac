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
