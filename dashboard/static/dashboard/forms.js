// Forms: move focus to the error summary after a failed submit, copy buttons, confirmations,
// and show only the chosen workflow's parameters.
"use strict";
(function () {
  const errors = document.getElementById("form-errors");
  if (errors) {
    const firstInvalid = document.querySelector('[aria-invalid="true"]');
    (firstInvalid || errors).focus();
  }

  document.querySelectorAll("[data-copy]").forEach((button) => {
    button.addEventListener("click", () => {
      const input = document.getElementById(button.dataset.copy);
      const status = button.parentElement.querySelector("[data-copy-status]");
      input.select();
      const done = () => status && (status.textContent = "Copied.");
      if (navigator.clipboard) {
        navigator.clipboard.writeText(input.value).then(done, () => {
          if (status) status.textContent = "Select the text and copy it with Ctrl+C.";
        });
      } else {
        done();
      }
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
