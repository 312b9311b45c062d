// The console's only script: checks a program file as it is typed (the server's own
// checker) and lists the problems at their file:line:column; each moves the cursor there.
// Every page works without it.
"use strict";

(function () {
  const DELAY_MS = 400;

  function lineStart(text, line) {
    let at = 0;
    for (let n = 1; n < line && at !== -1; n++) {
      at = text.indexOf("\n", at);
      if (at !== -1) at += 1;
    }
    return at === -1 ? text.length : at;
  }

  function goTo(area, line, column) {
    const at = Math.min(lineStart(area.value, line) + Math.max(column - 1, 0), area.value.length);
    area.focus();
    area.setSelectionRange(at, at);
  }

  function show(area, status, list, answer) {
    list.replaceChildren();
    const errors = answer.problems.filter((p) => !p.warning).length;
    const warnings = answer.problems.length - errors;
    status.textContent = errors
      ? `${errors} error(s), ${warnings} warning(s): the program would not load.`
      : `No errors${warnings ? `, ${warnings} warning(s)` : ""}: the program loads.`;
    status.className = "check-status " + (errors ? "has-errors" : "clean");
    for (const p of answer.problems) {
      const item = document.createElement("li");
      item.className = p.warning ? "warning" : "problem";
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = `${p.file}:${p.line}:${p.column}: ${p.warning ? "warning: " : ""}${p.message}`;
      button.addEventListener("click", () => goTo(area, p.line, p.column));
      item.append(button);
      list.append(item);
    }
  }

  function watch(area) {
    const status = document.getElementById("check-status");
    const list = document.getElementById("check-problems");
    let timer = null;
    let sent = 0;
    async function check() {
      const mine = ++sent;
      status.textContent = "Checking…";
      try {
        const answer = await fetch(area.dataset.checkUrl, {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": area.dataset.csrf },
          body: JSON.stringify({ file: area.dataset.file, text: area.value }),
        });
        const body = await answer.json();
        if (mine !== sent) return; // a later check is under way
        if (!answer.ok) {
          status.textContent = `Not checked: ${body.error ? body.error.message : answer.status}`;
          return;
        }
        show(area, status, list, body);
      } catch (e) {
        if (mine === sent) status.textContent = "Not checked: the server did not answer.";
      }
    }
    area.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(check, DELAY_MS);
    });
    check();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const area = document.querySelector("textarea[data-check-url]");
    if (area) watch(area);
  });
})();
