/*
 * NBV in-app widget. Drop-in, no build step:
 *
 *   <script src="https://nbv.example.com/widget.js" data-user-id="ana"
 *           data-key="nbv_pk_…" data-api="https://nbv.example.com" async></script>
 *
 * data-key is a publishable key for that person, minted by your backend (POST /v1/widget/keys
 * with a decisions:read key): it opens only their inbox, stream, preferences and responses.
 * Never put a secret key (nbv_sk_…) in a page. A page on another origin than the API needs
 * its origin in NBV_CORS_ORIGINS.
 *
 * Optional attributes: data-target (CSS selector of the element to render into; default: a
 * container placed right after the script tag), data-max (cards shown at once, default 3).
 * It listens to the person's live inbox (server-sent events), renders each card — What, Why,
 * How with its resources — and reports shown / clicked / completed / dismissed / snoozed to
 * POST /v1/responses. Everything from the API is inserted as text, never as HTML.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script) { return; }
  var userId = script.getAttribute("data-user-id");
  var key = script.getAttribute("data-key");
  var api = (script.getAttribute("data-api") || "").replace(/\/+$/, "");
  var max = parseInt(script.getAttribute("data-max") || "3", 10) || 3;
  if (!userId) { console.warn("nbv widget: data-user-id is required"); return; }
  if (!key) { console.warn("nbv widget: data-key (a publishable key) is required"); return; }

  var root;
  var selector = script.getAttribute("data-target");
  if (selector) { root = document.querySelector(selector); }
  if (!root) {
    root = document.createElement("div");
    script.parentNode.insertBefore(root, script.nextSibling);
  }
  root.classList.add("nbv-widget");
  root.setAttribute("aria-live", "polite");

  var style = document.createElement("style");
  style.textContent = [
    ".nbv-widget{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;max-width:28rem}",
    ".nbv-card{border:1px solid #d9dee4;border-radius:8px;padding:14px 16px;margin:0 0 12px;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.05)}",
    ".nbv-title{font-size:16px;font-weight:600;margin:0 0 8px}",
    ".nbv-what,.nbv-why{font-size:14px;margin:0 0 6px;color:#1f2933}",
    ".nbv-why{color:#52606d}",
    ".nbv-how{list-style:none;padding:0;margin:8px 0}",
    ".nbv-how li{margin:0 0 4px}",
    ".nbv-how a{color:#2459d6;font-size:14px}",
    ".nbv-actions button{margin:6px 6px 0 0;font-size:13px;padding:4px 10px;border-radius:4px;border:1px solid #c3cad3;background:#f5f7fa;cursor:pointer}",
    ".nbv-actions .nbv-done{background:#2459d6;color:#fff;border-color:#2459d6}"
  ].join("\n");
  document.head.appendChild(style);

  var cards = {};   // card id -> {card, el}
  var shown = {};   // decision:element already reported as shown

  function report(card, outcome) {
    return fetch(api + "/v1/responses", {
      method: "POST",
      headers: {"content-type": "application/json", "authorization": "Bearer " + key},
      body: JSON.stringify({
        user_id: userId,
        decision_id: card.decision_id,
        element_id: card.element_id,
        outcome: outcome,
        channel: "in_app"
      }),
      keepalive: true
    }).then(function (r) {
      root.dispatchEvent(new CustomEvent("nbv:response", {detail: {outcome: outcome, status: r.status, element_id: card.element_id}}));
      return r;
    }).catch(function (e) { console.warn("nbv widget: could not report " + outcome, e); });
  }

  function safeUrl(url) {
    try {
      var u = new URL(url, window.location.href);
      return (u.protocol === "http:" || u.protocol === "https:") ? u.href : null;
    } catch (e) { return null; }
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function close(id) {
    var entry = cards[id];
    if (entry && entry.el.parentNode) { entry.el.parentNode.removeChild(entry.el); }
    delete cards[id];
    render();
  }

  function build(card) {
    var c = card.content;
    var box = el("section", "nbv-card");
    box.setAttribute("data-element-id", card.element_id);
    box.appendChild(el("h3", "nbv-title", c.title));
    var what = el("p", "nbv-what");
    what.appendChild(el("strong", null, "What: "));
    what.appendChild(document.createTextNode(c.what));
    box.appendChild(what);
    var why = el("p", "nbv-why");
    why.appendChild(el("strong", null, "Why: "));
    why.appendChild(document.createTextNode(c.why));
    box.appendChild(why);
    var how = el("ul", "nbv-how");
    (c.how || []).forEach(function (res) {
      var href = safeUrl(res.url);
      if (!href) { return; }
      var li = el("li");
      var a = el("a", "nbv-resource", res.label);
      a.href = href;
      a.target = "_blank";
      a.rel = "noopener";
      a.setAttribute("data-type", res.type);
      a.addEventListener("click", function () { report(card, "clicked"); });
      li.appendChild(a);
      how.appendChild(li);
    });
    box.appendChild(how);
    var actions = el("div", "nbv-actions");
    [["completed", "Done", "nbv-done"], ["snoozed", "Later", "nbv-later"],
     ["dismissed", "Not for me", "nbv-dismiss"]].forEach(function (spec) {
      var b = el("button", spec[2], spec[1]);
      b.type = "button";
      b.addEventListener("click", function () {
        report(card, spec[0]).then(function () { close(card.id); });
      });
      actions.appendChild(b);
    });
    box.appendChild(actions);
    return box;
  }

  function render() {
    var ordered = Object.keys(cards).map(function (k) { return cards[k]; })
      .sort(function (a, b) {
        return (b.card.updated_at > a.card.updated_at ? 1 : -1) || a.card.rank - b.card.rank;
      });
    ordered.forEach(function (entry, i) {
      if (i < max) {
        if (entry.el.parentNode !== root) { root.appendChild(entry.el); }
        var key = entry.card.decision_id + ":" + entry.card.element_id;
        if (!shown[key]) { shown[key] = true; report(entry.card, "shown"); }
      } else if (entry.el.parentNode) {
        entry.el.parentNode.removeChild(entry.el);
      }
    });
  }

  function upsert(card) {
    if (["pending", "shown", "clicked"].indexOf(card.status) < 0) { close(card.id); return; }
    var old = cards[card.id];
    if (old && old.card.decision_id === card.decision_id && old.card.updated_at === card.updated_at) {
      old.card = card;
      return;
    }
    var node = build(card);
    if (old && old.el.parentNode) { old.el.parentNode.replaceChild(node, old.el); }
    cards[card.id] = {card: card, el: node};
    render();
  }

  // EventSource cannot send headers: the stream (only) takes the publishable key as ?key=.
  var source = new EventSource(api + "/v1/users/" + encodeURIComponent(userId) +
    "/inbox/stream?key=" + encodeURIComponent(key));
  source.addEventListener("card", function (e) { upsert(JSON.parse(e.data)); });
  source.addEventListener("remove", function (e) { close(JSON.parse(e.data).id); });
  window.NBVWidget = {root: root, cards: cards, close: function () { source.close(); }};
})();
