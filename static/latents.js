// The latent page's keys: j = next latent, k = previous one, in the latent table's current
// order and search (the page's #latent-next / #latent-prev links carry them). Keys typed into
// a field (the label editor, the try-it box) are left alone.
(function () {
  function typing(el) {
    if (!el) return false;
    var tag = el.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || el.isContentEditable;
  }
  document.addEventListener("keydown", function (event) {
    if (event.defaultPrevented || event.altKey || event.ctrlKey || event.metaKey) return;
    if (typing(event.target) || typing(document.activeElement)) return;
    var id = event.key === "j" ? "latent-next" : event.key === "k" ? "latent-prev" : null;
    if (!id) return;
    var link = document.getElementById(id);
    if (!link || !link.href) return;
    event.preventDefault();
    window.location.href = link.href;
  });
})();
