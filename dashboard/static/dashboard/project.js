// A project's overview: site status and the jobs table (one page of it, filtered), live.
"use strict";
(function () {
  const socketPath = document.currentScript.dataset.socket;
  const live = window.FedPortalLive;
  const siteRows = document.getElementById("site-rows");
  const jobRows = document.getElementById("job-rows");

  function onSiteStatus(event) {
    const row = siteRows.querySelector('tr[data-site="' + CSS.escape(event.site) + '"]');
    if (!row || row.dataset.state !== event.state) {
      live.refresh(siteRows); // a new site, or one revoked: its row changes more than this
      return;
    }
    live.touched(siteRows);
    const online = row.querySelector('[data-field="online"]');
    online.innerHTML = event.online
      ? '<span class="badge online">online</span>'
      : '<span class="badge offline">offline</span>';
    if (event.last_heartbeat) {
      const when = new Date(event.last_heartbeat);
      const cell = row.querySelector('[data-field="last_heartbeat"]');
      const time = document.createElement("time");
      time.dateTime = event.last_heartbeat;
      time.textContent = when.toISOString().slice(0, 19).replace("T", " ") + " UTC";
      cell.replaceChildren(time);
    }
    row.querySelector('[data-field="agent_version"]').textContent = event.agent_version || "—";
    live.announce("sites-announce", "Site " + event.site + " is " + (event.online ? "online" : "offline") + ".");
  }

  live.connect(socketPath, (event) => {
    if (event.kind === "site.status") onSiteStatus(event);
    else if (event.kind === "job.state") {
      live.refresh(jobRows);
      live.announce("jobs-announce", "A job is now " + event.state + ".");
    } else if (event.kind === "round.state") live.refresh(jobRows);
    else if (event.kind === "synced") {
      live.refresh(jobRows);
      live.refresh(siteRows);
    }
  });
  // Heartbeats are not published one by one; keep "last heartbeat" and online status current.
  setInterval(() => live.refresh(siteRows, 0), 30000);
})();
