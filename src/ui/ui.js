// dari-relay status page: the only script. Without it every page still
// works (a <noscript> refresh stands in). It refreshes <main> in place every
// few seconds, unless the operator is typing or the tab is hidden, and asks
// before buttons marked data-confirm.
"use strict";
(function () {
  var main = document.getElementById("main");
  var every = main && Number(main.dataset.refresh) * 1000;
  function busy() {
    var a = document.activeElement;
    // Anything focused inside the page (a field being typed in, a link or
    // button reached with the keyboard) would lose its focus: wait.
    return document.hidden || (a && a !== document.body && main.contains(a)) ||
      document.querySelector("details[open]") !== null;
  }
  function refresh() {
    if (busy()) { return; }
    fetch(location.href, { credentials: "same-origin", headers: { "X-Requested-With": "refresh" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html || busy()) { return; }
        var next = new DOMParser().parseFromString(html, "text/html").getElementById("main");
        if (next) { main.innerHTML = next.innerHTML; }
      })
      .catch(function () {});
  }
  if (every > 0) { setInterval(refresh, every); }
  document.addEventListener("submit", function (e) {
    var message = e.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) { e.preventDefault(); }
  });
})();
