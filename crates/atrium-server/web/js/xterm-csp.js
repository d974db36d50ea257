// Lets xterm.js run under the dashboard's Content-Security-Policy (style-src 'self': no inline
// styles). xterm.js's DOM renderer writes its theme, palette and geometry rules into <style>
// elements it creates, and sets some colours with setAttribute('style', …); the policy blocks
// both. This module, imported before xterm.js is used, routes both through the CSSOM, which
// the policy does not govern: the text of a <style> element xterm.js creates goes into a
// constructed stylesheet adopted by the document (the element itself is an inert stand-in),
// and a style attribute is applied as the element's style.cssText.
// The policy itself stays as strict as on every other page.

const createElement = Document.prototype.createElement;
const setAttribute = Element.prototype.setAttribute;

/** Gives `el` (standing in for a <style> element) a stylesheet that its text goes into. */
function adoptStyle(el, doc) {
  const sheet = new doc.defaultView.CSSStyleSheet();
  let text = '';
  Object.defineProperty(el, 'textContent', {
    configurable: true,
    get: () => text,
    set: (value) => {
      text = value === null || value === undefined ? '' : String(value);
      sheet.replaceSync(text);
    },
  });
  doc.adoptedStyleSheets = [...doc.adoptedStyleSheets, sheet];
  // The rules go when the element goes (xterm.js removes its elements on dispose).
  const remove = el.remove;
  el.remove = function removeWithSheet() {
    doc.adoptedStyleSheets = doc.adoptedStyleSheets.filter((s) => s !== sheet);
    return remove.call(this);
  };
}

Document.prototype.createElement = function createElementCsp(tag, options) {
  if (typeof tag === 'string' && tag.toLowerCase() === 'style') {
    // Even an empty <style> element is inline style to the policy: xterm.js gets an inert
    // <template> (never rendered) standing in for it, and its rules go to the stylesheet.
    const el = createElement.call(this, 'template');
    el.dataset.xtermStyle = '';
    adoptStyle(el, this);
    return el;
  }
  return createElement.call(this, tag, options);
};

Element.prototype.setAttribute = function setAttributeCsp(name, value) {
  if (typeof name === 'string' && name.toLowerCase() === 'style' && this.style) {
    this.style.cssText = String(value);
    return;
  }
  setAttribute.call(this, name, value);
};
