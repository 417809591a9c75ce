// Clocks the pages tick every second (window.FedPortalClock), and a project's "Sites lagging"
// section, live.
// - [data-since]: the time since then, as dashboard/job_records.py duration_text writes it;
// - [data-deadline]: the time left until then, or how long ago it passed.
// On the project page, project.js updates the sites table in place when an agent connects or
// disconnects, and the jobs table when a job or round changes: either may change who is
// lagging, so the section is fetched again then. Lagging by time (half a round gone) has no
// event: the section is also fetched every 15 seconds.
"use strict";
(function () {
  function duration(ms) {
    const total = Math.max(0, Math.floor(ms / 1000));
    const hours = Math.floor(total / 3600);
    const minutes = Math.floor((total % 3600) / 60);
    const seconds = total % 60;
    const two = (n) => String(n).padStart(2, "0");
    if (hours) return hours + " h " + two(minutes) + " min " + two(seconds) + " s";
    if (minutes) return minutes + " min " + two(seconds) + " s";
    return seconds + " s";
  }

  function tick() {
    const now = Date.now();
    document.querySelectorAll("[data-since]").forEach((el) => {
      const since = Date.parse(el.dataset.since);
      if (!Number.isNaN(since)) el.textContent = duration(now - since);
    });
    document.querySelectorAll("[data-deadline]").forEach((el) => {
      const deadline = Date.parse(el.dataset.deadline);
      if (Number.isNaN(deadline)) return;
      el.textContent = deadline >= now
        ? duration(deadline - now) + " left"
        : "passed " + duration(now - deadline) + " ago";
      el.classList.toggle("is-past", deadline < now);
    });
  }
  tick();
  setInterval(tick, 1000);
  window.FedPortalClock = { tick, duration };

  const live = window.FedPortalLive;
  const lagging = document.getElementById("lagging-sites");
  if (!live || !lagging) return;
  const watch = new MutationObserver(() => live.refresh(lagging, 100));
  ["site-rows", "job-rows"].forEach((id) => {
    const el = document.getElementById(id);
    if (el) watch.observe(el, { childList: true, subtree: true, characterData: true });
  });
  setInterval(() => live.refresh(lagging, 0), 15000);
})();
