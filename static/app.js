// SAE Studio: htmx settings and one small form nicety. No framework.
(function () {
  // Swap 422 (forms re-render with their errors) and 409/404/413 (messages go to #flash).
  htmx.config.responseHandling = [
    {code: "204", swap: false},
    {code: "[23]..", swap: true},
    {code: "422", swap: true, error: false},
    {code: "409", swap: true, error: false},
    {code: "404", swap: true, error: false},
    {code: "413", swap: true, error: false},
    {code: "[45]..", swap: false, error: true},
    {code: "...", swap: false},
  ];
})();

// "Start Training" stays disabled until a model and a dataset are chosen.
function saeUpdateStart() {
  var form = document.getElementById("training-form");
  if (!form) return;
  var model = form.querySelector("[name=model_id]");
  var dataset = form.querySelector("[name=dataset_id]");
  var start = document.getElementById("start-training");
  if (start && model && dataset) start.disabled = !(model.value && dataset.value);
}
document.addEventListener("change", saeUpdateStart);
document.addEventListener("htmx:afterSettle", saeUpdateStart);

// Show only the fields that apply to the chosen encoder type (data-applies-to="topk batchtopk").
// Without JS every field stays visible and the server ignores those of other types.
function saeShowEncoderFields() {
  var form = document.getElementById("training-form");
  if (!form) return;
  var select = form.querySelector("[name=encoder_type]");
  if (!select) return;
  var fields = form.querySelectorAll("[data-applies-to]");
  for (var i = 0; i < fields.length; i++) {
    var types = fields[i].getAttribute("data-applies-to").split(/\s+/);
    // style, not the hidden attribute: .field sets display: flex, which would override it.
    fields[i].style.display = types.indexOf(select.value) < 0 ? "none" : "";
  }
}
document.addEventListener("change", saeShowEncoderFields);
document.addEventListener("htmx:afterSettle", saeShowEncoderFields);
document.addEventListener("DOMContentLoaded", saeShowEncoderFields);

// The top bar says when the web server cannot be reached: an htmx request (the heartbeat poll
// every 5 s, or any other) failed at the network level. The next poll that gets an answer
// replaces the element with the server's view again.
function saeServerUnreachable() {
  var el = document.getElementById("worker-status");
  if (!el) return;
  el.className = "worker-status down unreachable";
  el.title = "The web server does not answer; trying again every 5 s.";
  var text = document.getElementById("worker-alive");
  if (text) text.textContent = "server unreachable";
}
document.addEventListener("htmx:sendError", saeServerUnreachable);

// Sweep mode: the encoder type field holds comma-separated types; show the fields that apply
// to any of them (runs after saeShowEncoderFields, which compares the whole value).
function saeShowSweepEncoderFields() {
  var form = document.getElementById("training-form");
  if (!form || form.getAttribute("data-mode") !== "sweep") return;
  var input = form.querySelector("[name=encoder_type]");
  if (!input) return;
  var chosen = input.value.split(",").map(function (s) { return s.trim(); });
  var fields = form.querySelectorAll("[data-applies-to]");
  for (var i = 0; i < fields.length; i++) {
    var types = fields[i].getAttribute("data-applies-to").split(/\s+/);
    var any = chosen.some(function (t) { return types.indexOf(t) >= 0; });
    fields[i].style.display = any ? "" : "none";
  }
}
document.addEventListener("change", saeShowSweepEncoderFields);
document.addEventListener("htmx:afterSettle", saeShowSweepEncoderFields);
document.addEventListener("DOMContentLoaded", saeShowSweepEncoderFields);

// "Compare selected" is disabled until a training is ticked (the hint beside it says so).
// The server renders it enabled: without JavaScript it opens /compare, which says what to do.
function saeUpdateCompare() {
  var button = document.getElementById("compare-selected");
  if (!button) return;
  var ticked = document.querySelectorAll(".compare-tick:checked").length;
  button.disabled = ticked === 0;
  button.title = ticked ? "Compare the ticked trainings (curves, final figures, Pareto fronts)"
                        : "Tick at least one training to compare";
  var hint = document.getElementById("compare-hint");
  if (hint) hint.textContent = ticked ? ticked + " ticked" : "Tick trainings to compare";
}
document.addEventListener("change", saeUpdateCompare);
document.addEventListener("htmx:afterSettle", saeUpdateCompare);
document.addEventListener("htmx:oobAfterSwap", saeUpdateCompare);
document.addEventListener("DOMContentLoaded", saeUpdateCompare);
window.addEventListener("pageshow", saeUpdateCompare);  // back: the browser restores ticks

// A card's log box opens on its newest line (app.css: column-reverse, where scrollTop is the
// distance up from the newest line: 0 at the bottom, negative above). A swap of the log (a
// WebSocket part, or the whole card) keeps a reader who scrolled up where they were.
var saeLogScroll = {};
function saeSaveLogScroll(event) {
  var target = event.detail && event.detail.target;
  if (!target || !target.querySelectorAll) return;
  var logs = target.matches(".log") ? [target] : target.querySelectorAll(".log");
  for (var i = 0; i < logs.length; i++) {
    if (logs[i].id && logs[i].scrollTop) saeLogScroll[logs[i].id] = logs[i].scrollTop;
  }
}
function saeRestoreLogScroll() {
  for (var id in saeLogScroll) {
    var el = document.getElementById(id);
    if (el) el.scrollTop = saeLogScroll[id];
  }
  saeLogScroll = {};
}
document.addEventListener("htmx:beforeSwap", saeSaveLogScroll);
document.addEventListener("htmx:oobBeforeSwap", saeSaveLogScroll);
document.addEventListener("htmx:afterSwap", saeRestoreLogScroll);
document.addEventListener("htmx:oobAfterSwap", saeRestoreLogScroll);

// A card's line charts stretch to their box (preserveAspectRatio="none", so that live swaps
// never move the layout), and their text stretched with them: squeezed to two thirds of its
// width on a phone. Each such chart gets --sae-text-sx, its vertical over its horizontal
// scale; app.css scales its text's width by it, so the text keeps its shape at any width.
function saeChartText() {
  var charts = document.querySelectorAll('svg.chart[preserveAspectRatio="none"]');
  for (var i = 0; i < charts.length; i++) {
    var svg = charts[i], box = svg.viewBox && svg.viewBox.baseVal;
    if (!box || !box.width || !box.height || !svg.clientWidth || !svg.clientHeight) continue;
    var ratio = (svg.clientHeight / box.height) / (svg.clientWidth / box.width);
    svg.style.setProperty("--sae-text-sx", ratio.toFixed(3));
  }
}
document.addEventListener("DOMContentLoaded", saeChartText);
document.addEventListener("htmx:afterSettle", saeChartText);
document.addEventListener("htmx:oobAfterSwap", saeChartText);
document.addEventListener("htmx:wsAfterMessage", saeChartText);  // parts swapped in by the socket
window.addEventListener("resize", saeChartText);

// A field's long help is cut at two lines with a "more" toggle after it (_macros.html
// help_text). Where the whole text fits in two lines at the current width, the toggle would
// show nothing more: the field gets .help-fits and app.css hides it. Measured again whenever
// the help's box changes (a resize, the Advanced section opening, a field shown for another
// encoder type); a help not laid out (hidden) keeps its mark until it is.
var saeHelpObserver = window.ResizeObserver ? new ResizeObserver(function (entries) {
  for (var i = 0; i < entries.length; i++) saeFitHelp(entries[i].target);
}) : null;
function saeFitHelp(help) {
  var field = help.parentElement;
  if (!field || !help.scrollHeight) return;
  var lines = help.scrollHeight / parseFloat(getComputedStyle(help).lineHeight);
  field.classList.toggle("help-fits", lines < 2.5);
}
function saeWatchHelp() {
  if (saeHelpObserver) saeHelpObserver.disconnect();  // forget helps swapped out
  var toggles = document.querySelectorAll(".field > .help-more");
  for (var i = 0; i < toggles.length; i++) {
    var help = toggles[i].previousElementSibling;
    if (!help) continue;
    saeFitHelp(help);
    if (saeHelpObserver) saeHelpObserver.observe(help);
  }
}
document.addEventListener("DOMContentLoaded", saeWatchHelp);
document.addEventListener("htmx:afterSettle", saeWatchHelp);
document.addEventListener("htmx:oobAfterSwap", saeWatchHelp);
