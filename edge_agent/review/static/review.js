// edge-agent review: keyboard navigation, heatmap placement and opacity, zoom. No external scripts.
(function () {
  "use strict";
  function go(sel) { var a = document.querySelector(sel); if (a) { window.location.href = a.href; } }
  document.addEventListener("keydown", function (e) {
    var t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable)) { return; }
    if (e.altKey || e.ctrlKey || e.metaKey) { return; }
    if (e.key === "ArrowRight" || e.key === "j") { go("a[rel=next]"); }
    else if (e.key === "ArrowLeft" || e.key === "k") { go("a[rel=prev]"); }
    else if (e.key === "u") { go("nav.casenav a"); }
    else if (e.key === "Enter" && document.getElementById("worklist")) { go("#worklist a.case-link"); }
  });

  // The heatmap covers the part of the photo the model saw (preprocess.resize_and_crop): the centred square of
  // the shorter side, or the whole photo for the "stretch" rule; for "lesion_crop" the server sends a canvas
  // of the photo's shape with the map where the lesion square was (review/heatmap.py framed), placed whole.
  function placeHeatmap() {
    var stage = document.getElementById("stage"), photo = document.getElementById("photo"),
        heat = document.getElementById("heatmap");
    if (!stage || !photo || !heat || !photo.naturalWidth) { return; }
    var w = photo.clientWidth, h = photo.clientHeight;
    if (stage.dataset.rule === "stretch" || stage.dataset.rule === "lesion_crop") {
      heat.style.left = "0px"; heat.style.top = "0px"; heat.style.width = w + "px"; heat.style.height = h + "px";
      return;
    }
    var side = Math.min(w, h);
    heat.style.left = ((w - side) / 2) + "px"; heat.style.top = ((h - side) / 2) + "px";
    heat.style.width = side + "px"; heat.style.height = side + "px";
  }
  window.addEventListener("load", placeHeatmap);
  window.addEventListener("resize", placeHeatmap);

  document.addEventListener("DOMContentLoaded", function () {
    var photo = document.getElementById("photo");
    if (photo) { photo.addEventListener("load", placeHeatmap); if (photo.complete) { placeHeatmap(); } }
    var op = document.getElementById("opacity"), heat = document.getElementById("heatmap");
    if (op && heat) {
      var apply = function () { heat.style.opacity = String(op.value / 100); };
      op.addEventListener("input", apply); apply();
    }
    var sel = document.getElementById("heatclass");
    if (sel && heat) {
      sel.addEventListener("change", function () {
        heat.src = heat.dataset.base.replace("LABEL", encodeURIComponent(sel.value));
      });
    }
    var zoom = document.getElementById("zoom"), img = document.getElementById("fullimg"),
        val = document.getElementById("zoomval"), view = document.getElementById("fullview");
    if (zoom && img) {
      var setZoom = function (pct) {
        zoom.value = String(pct);
        img.style.width = (img.naturalWidth * pct / 100) + "px";
        if (val) { val.textContent = pct + " %"; }
      };
      zoom.addEventListener("input", function () { setZoom(Number(zoom.value)); });
      var fit = function () {
        if (!img.naturalWidth || !view) { return; }
        setZoom(Math.max(10, Math.min(400, Math.floor(100 * view.clientWidth / img.naturalWidth))));
      };
      document.getElementById("fit").addEventListener("click", fit);
      document.getElementById("actual").addEventListener("click", function () { setZoom(100); });
      img.addEventListener("load", fit); if (img.complete) { fit(); }
      img.addEventListener("wheel", function (e) {
        if (!e.ctrlKey) { return; }
        e.preventDefault();
        setZoom(Math.max(10, Math.min(400, Number(zoom.value) + (e.deltaY < 0 ? 10 : -10))));
      }, { passive: false });
    }
  });
}());
