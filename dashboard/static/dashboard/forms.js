// Forms: move focus to the error summary after a failed submit, copy buttons, confirmations,
// and show only the chosen workflow's parameters.
"use strict";
(function () {
  const errors = document.getElementById("form-errors");
  if (errors) {
    const firstInvalid = document.querySelector('[aria-invalid="true"]');
    (firstInvalid || errors).focus();
  }

  // Copy buttons say "Copied." only once the clipboard took the text. Where it cannot be
  // written (no navigator.clipboard on a plain-http origin, or the browser refused), the text
  // is left selected and the person is told to copy it themselves.
  document.querySelectorAll("[data-copy]").forEach((button) => {
    button.addEventListener("click", () => {
      const input = document.getElementById(button.dataset.copy);
      const status = button.parentElement.querySelector("[data-copy-status]");
      const say = (text) => {
        if (status) status.textContent = text;
      };
      const selectIt = () => {
        input.focus();
        input.select();
        say("Not copied: the text is selected, press Ctrl+C (⌘C on a Mac) to copy it.");
      };
      say("");
      let writing = null;
      try {
        writing = navigator.clipboard && navigator.clipboard.writeText(input.value);
      } catch (error) {
        writing = null;
      }
      if (!writing) {
        selectIt();
        return;
      }
      writing.then(() => {
        input.select();
        say("Copied.");
      }, selectIt);
    });
  });

  const workflow = document.getElementById("id_workflow");
  if (workflow) {
    const show = () => {
      document.querySelectorAll("fieldset[data-workflow]").forEach((fieldset) => {
        fieldset.hidden = fieldset.dataset.workflow !== workflow.value;
      });
    };
    workflow.addEventListener("change", show);
    show();
  }
})();

document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
    event.preventDefault();
  }
});
