// The dashboard's live connection: one WebSocket per page, reconnecting with back-off.
// Events are the JSON objects jobs/events.py and sites/events.py publish ({"kind": ...}).
"use strict";
(function () {
  const statusEls = () => document.querySelectorAll("[data-live-status]");

  function setStatus(text, live) {
    statusEls().forEach((el) => {
      el.textContent = text;
      el.classList.toggle("is-live", live);
    });
  }

  function connect(path, onEvent) {
    let delay = 500;
    let opened = false;
    function open() {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const socket = new WebSocket(scheme + "//" + location.host + path);
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
          if (opened) onEvent({ kind: "reconnected" }); // catch up on what was missed
          opened = true;
          return;
        }
        onEvent(event);
      });
      socket.addEventListener("close", (close) => {
        if (close.code === 4404) {
          setStatus("Live updates are not available for this page.", false);
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
  // folded into one request.
  const pending = new Map();
  function refresh(el, wait) {
    if (!el || pending.has(el)) return;
    pending.set(el, setTimeout(() => {
      pending.delete(el);
      fetch(el.dataset.refresh, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then((r) => (r.ok ? r.text() : null))
        .then((html) => {
          if (html !== null) el.innerHTML = html;
        })
        .catch(() => {});
    }, wait === undefined ? 150 : wait));
  }

  function announce(id, text) {
    const el = document.getElementById(id);
    if (el) el.textContent = text;
  }

  function scriptData(name) {
    return document.currentScript ? document.currentScript.dataset[name] : undefined;
  }

  window.FedPortalLive = { connect, refresh, announce, scriptData };
})();
