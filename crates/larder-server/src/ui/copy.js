// larder's web UI: optional "Copy" buttons on the copyable blocks (nix.conf lines, the flake
// block, the public key). Progressive enhancement only: without JavaScript the blocks select
// whole on one tap (CSS user-select: all) and everything else works the same.
"use strict";
document.querySelectorAll("pre[data-copy]").forEach(function (pre) {
  var button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy " + pre.getAttribute("data-copy"));
  function done(text) {
    button.textContent = text;
    setTimeout(function () { button.textContent = "Copy"; }, 1500);
  }
  function selectIt() {
    var range = document.createRange();
    range.selectNodeContents(pre);
    var sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    try {
      done(document.execCommand("copy") ? "Copied" : "Selected");
    } catch (e) {
      done("Selected");
    }
  }
  button.addEventListener("click", function () {
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(pre.textContent).then(function () { done("Copied"); }, selectIt);
    } else {
      selectIt();
    }
  });
  var head = pre.previousElementSibling;
  if (head && head.classList.contains("copy-head")) {
    head.appendChild(button);
  } else {
    pre.parentNode.insertBefore(button, pre);
  }
});
