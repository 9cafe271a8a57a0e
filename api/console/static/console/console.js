// The operator console's only script: live parts, streamed pull/create progress, confirmations.
// Every page works without it except those three; nothing here builds HTML from data (the server escapes).
"use strict";

function refreshLive(el) {
  // Swap in the server-rendered fragment every 2 s, unless the tab is hidden or the keyboard focus is inside
  // (replacing the element under the focus would throw a keyboard user back to the top of the page).
  let last = null;
  const tick = async () => {
    if (!document.hidden && !el.contains(document.activeElement)) {
      try {
        const reply = await fetch(el.dataset.refresh, { credentials: "same-origin" });
        if (reply.redirected) {
          window.location = reply.url; // the session ended: the sign-in page
          return;
        }
        if (reply.ok) {
          const html = await reply.text();
          if (html !== last) {
            el.innerHTML = html;
            last = html;
          }
        }
      } catch (err) {
        // the server is restarting: try again on the next tick
      }
    }
    setTimeout(tick, 2000);
  };
  setTimeout(tick, 2000);
}

async function streamForm(form) {
  // POST the form and show its NDJSON progress lines ({status, total, completed} or {error}) as they come.
  const bar = form.querySelector("progress");
  const out = form.querySelector("output");
  const button = form.querySelector("button[type=submit]");
  const show = (step) => {
    if (step.error) {
      out.textContent = "Error: " + step.error;
      return;
    }
    out.textContent = step.status || "";
    if (step.total) {
      bar.max = step.total;
      bar.value = step.completed || 0;
    }
  };
  button.disabled = true;
  bar.hidden = false;
  bar.removeAttribute("value");
  out.textContent = "Starting…";
  let last = null;
  try {
    const reply = await fetch(form.action, {
      method: "POST", body: new FormData(form), credentials: "same-origin",
      headers: { Accept: "application/x-ndjson" },
    });
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 1);
        if (line) show((last = JSON.parse(line)));
      }
    }
    if (buffer.trim()) show((last = JSON.parse(buffer)));
    if (reply.ok && last && !last.error) {
      bar.value = bar.max;
      out.textContent = "Done: " + (last.status || "success");
    }
  } catch (err) {
    out.textContent = "Error: " + err.message;
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(refreshLive);
  document.querySelectorAll("form[data-stream]").forEach((form) =>
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      streamForm(form);
    }),
  );
  document.addEventListener("submit", (event) => {
    const message = event.target.dataset.confirm;
    if (message !== undefined && !window.confirm(message)) event.preventDefault();
  });
});
