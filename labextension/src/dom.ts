/**
 * Tiny DOM and SVG helpers (no framework: the panel re-renders a few nodes per second).
 */

type Attrs = { [name: string]: string | number | boolean | null | undefined };
type Child = Node | string | null | undefined | false;

/** Create an HTML element; text children are escaped by construction. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: (Child | Child[])[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

function svg(tag: string, attrs: Attrs): SVGElement {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  return el;
}

function setAttrs(el: Element, attrs: Attrs): void {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) {
      continue;
    }
    el.setAttribute(name, value === true ? '' : String(value));
  }
}

function append(el: Element, children: (Child | Child[])[]): void {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    el.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
  }
}

/**
 * A sparkline of percentages (0..100) over the last `windowS` seconds (now at the right
 * edge), as an SVG area chart that fills its box. `times` are the samples' times (s).
 */
export function sparkline(
  times: number[],
  values: number[],
  windowS: number,
  className: string,
  label: string
): SVGElement {
  const width = 100;
  const height = 24;
  const root = svg('svg', {
    class: `jp-AdaptiveNb-spark ${className}`,
    viewBox: `0 0 ${width} ${height}`,
    preserveAspectRatio: 'none',
    role: 'img',
    'aria-label': label
  });
  const title = svg('title', {});
  title.textContent = label;
  root.appendChild(title);
  if (values.length === 0) {
    return root;
  }
  const now = times[times.length - 1];
  const xs = times.map(t => Math.max(0, width * (1 - (now - t) / windowS)));
  const ys = values.map(
    v => height - (Math.min(100, Math.max(0, v)) / 100) * (height - 1) - 0.5
  );
  if (xs.length === 1) {
    xs.unshift(Math.max(0, xs[0] - 2)); // a single sample still shows as a short line
    ys.unshift(ys[0]);
  }
  const points = xs.map((x, i) => `${x.toFixed(2)},${ys[i].toFixed(2)}`);
  const area = `M${xs[0].toFixed(2)},${height} L${points.join(' L')} L${width},${height} Z`;
  root.appendChild(svg('path', { d: area, class: 'jp-AdaptiveNb-sparkArea' }));
  root.appendChild(
    svg('polyline', {
      points: points.join(' '),
      class: 'jp-AdaptiveNb-sparkLine',
      'vector-effect': 'non-scaling-stroke'
    })
  );
  return root;
}

/** A horizontal meter for a percentage; `level` colours it (ok/warn/high). */
export function meter(pct: number, label: string): HTMLElement {
  const clamped = Math.min(100, Math.max(0, pct));
  const level = clamped >= 90 ? 'high' : clamped >= 70 ? 'warn' : 'ok';
  const fill = h('div', {
    class: `jp-AdaptiveNb-meterFill jp-mod-${level}`,
    style: `width: ${clamped.toFixed(1)}%`
  });
  return h(
    'div',
    {
      class: 'jp-AdaptiveNb-meter',
      role: 'meter',
      'aria-label': label,
      'aria-valuemin': 0,
      'aria-valuemax': 100,
      'aria-valuenow': Math.round(clamped)
    },
    fill
  );
}
