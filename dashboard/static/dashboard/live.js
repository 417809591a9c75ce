// The dashboard's live connection: one WebSocket per page, reconnecting with back-off.
// Events are the JSON objects jobs/events.py and sites/events.py publish ({"kind": ...}).
// Once a socket says hello, the page is told {"kind": "synced"}: whatever happened between
// the page's render (or the last socket) and now was not heard, so the page fetches its state
// again. The portal closes a socket whose access ended (signed out: 4401; page no longer
// visible: 4404) or one too many (4429), saying why just before; see fedportal/sockets.py.
"use strict";
(function () {
  const statusEls = () => document.querySelectorAll("[data-live-status]");
  const ENDED = [4401, 4403, 4404];
  const TOO_MANY = 4429;

  function setStatus(text, live) {
    statusEls().forEach((el) => {
      el.textContent = text;
      el.classList.toggle("is-live", live);
    });
  }

  function connect(path, onEvent) {
    let delay = 500;
    function open() {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const socket = new WebSocket(scheme + "//" + location.host + path);
      let said = null; // the portal's last word before it closes the socket
      socket.addEventListener("message", (message) => {
        let event;
        try {
          event = JSON.parse(message.data);
        } catch (error) {
          return;
        }
        if (event.kind === "hello") {
          setStatus("Live: updates appear as they happen.", true);
          delay = 500;
          onEvent({ kind: "synced" });
          return;
        }
        if (event.kind === "closed" || event.kind === "error") {
          said = event;
          return;
        }
        onEvent(event);
      });
      socket.addEventListener("close", (close) => {
        if (ENDED.includes(close.code)) {
          // Access ended: connecting again would only be refused.
          setStatus(said ? said.message : "Live updates are not available for this page.", false);
          return;
        }
        if (close.code === TOO_MANY) {
          setStatus((said ? said.message + " " : "") + "Trying again in 30 seconds.", false);
          setTimeout(open, 30000);
          return;
        }
        setStatus("Live updates interrupted; reconnecting…", false);
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 15000);
      });
    }
    open();
  }

  // Fetch a server-rendered fragment again and put it in place; calls within `wait` ms are
  // folded into one request. A fetch that was on its way when the element changed in place
  // (touched, below) may have been rendered before that change: it is fetched once more.
  const pending = new Map();
  const inflight = new Map(); // element -> whether to fetch again once this answer is in
  function refresh(el, wait) {
    if (!el) return;
    if (inflight.has(el)) {
      inflight.set(el, true);
      return;
    }
    if (pending.has(el)) return;
    pending.set(el, setTimeout(() => {
      pending.delete(el);
      inflight.set(el, false);
      fetch(el.dataset.refresh, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then((r) => (r.ok ? r.text() : null))
        .then((html) => {
          if (html !== null) replaceKeepingTicks(el, html);
        })
        .catch(() => {})
        .finally(() => {
          const again = inflight.get(el);
          inflight.delete(el);
          if (again) refresh(el, 0);
        });
    }, wait === undefined ? 150 : wait));
  }

  // A refreshed table keeps the boxes a person ticked in it (jobs picked to compare).
  function replaceKeepingTicks(el, html) {
    const key = (box) => box.name + "=" + box.value;
    const ticked = new Set([...el.querySelectorAll("input[type=checkbox]:checked")].map(key));
    el.innerHTML = html;
    if (!ticked.size) return;
    el.querySelectorAll("input[type=checkbox]").forEach((box) => {
      if (ticked.has(key(box))) box.checked = true;
    });
  }

  // An event changed `el` in place: an answer already on its way could undo that.
  function touched(el) {
    if (el && inflight.has(el)) inflight.set(el, true);
  }

  function announce(id, text) {
    const el = document.getElementById(id);
    if (el) el.textContent = text;
  }

  function scriptData(name) {
    return document.currentScript ? document.currentScript.dataset[name] : undefined;
  }

  window.FedPortalLive = { connect, refresh, touched, announce, scriptData };
})();
