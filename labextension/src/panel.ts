/**
 * The "Adaptive resources" sidebar: GPUs (utilisation and memory sparklines), GPU processes
 * with the notebook that owns them, CPU and RAM, and the active adaptive training runs.
 */
import { PathExt, Time } from '@jupyterlab/coreutils';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { IGpu, IGpuProcess, IResources, IRun } from './api';
import { h, meter, sparkline } from './dom';
import { formatGB, formatRate, HISTORY_SECONDS, ResourcesModel } from './model';

/** Opens a notebook by its server path (e.g. via `docmanager:open`). */
export type OpenPath = (path: string) => void;

export class ResourcesPanel extends Widget {
  constructor(model: ResourcesModel, openPath: OpenPath) {
    super();
    this._model = model;
    this._openPath = openPath;
    this.id = 'adaptive-nb-resources';
    this.addClass('jp-AdaptiveNb-panel');
    this.title.caption = 'Adaptive resources';
    this._model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    this._model.detailed = true;
    this._render();
  }

  protected onAfterHide(msg: Message): void {
    this._model.detailed = false;
  }

  private _render(): void {
    if (!this.isVisible && this.node.childElementCount > 0) {
      return; // nothing to draw while hidden; drawn again when shown
    }
    const r = this._model.resources;
    const body = h(
      'div',
      { class: 'jp-AdaptiveNb-body' },
      h('header', { class: 'jp-AdaptiveNb-header' }, h('h2', {}, 'Adaptive resources')),
      this._model.error
        ? h(
            'div',
            { class: 'jp-AdaptiveNb-error', role: 'alert' },
            `Cannot reach the adaptive_nb server extension: ${this._model.error}`
          )
        : null,
      r ? this._gpus(r) : h('div', { class: 'jp-AdaptiveNb-empty' }, 'Loading…'),
      r && r.gpus.length > 0 ? this._processes(r) : null,
      r ? this._host(r) : null,
      this._runs(this._model.runs)
    );
    this.node.replaceChildren(body);
  }

  private _gpus(r: IResources): HTMLElement {
    const section = h(
      'section',
      { class: 'jp-AdaptiveNb-section', 'data-section': 'gpus' },
      h('h3', {}, 'GPUs')
    );
    if (r.gpus.length === 0) {
      section.appendChild(
        h(
          'div',
          { class: 'jp-AdaptiveNb-notice', 'data-adaptive': 'no-gpu' },
          h('strong', {}, 'No GPU found.'),
          ' ',
          r.notice ?? 'Showing CPU and RAM only.'
        )
      );
      return section;
    }
    for (const gpu of r.gpus) {
      section.appendChild(this._gpu(gpu));
    }
    return section;
  }

  private _gpu(gpu: IGpu): HTMLElement {
    const hist = this._model.history(gpu.uuid);
    const memPct =
      gpu.memory_total_mb > 0 ? (100 * gpu.memory_used_mb) / gpu.memory_total_mb : 0;
    return h(
      'div',
      { class: 'jp-AdaptiveNb-gpu', 'data-gpu': gpu.uuid },
      h(
        'div',
        { class: 'jp-AdaptiveNb-gpuTitle' },
        h('span', { class: 'jp-AdaptiveNb-gpuIndex' }, gpuLabel(gpu)),
        h('span', { class: 'jp-AdaptiveNb-gpuName', title: gpu.name }, gpu.name.replace(/^NVIDIA /, '')),
        gpu.simulated ? badge('simulated') : null
      ),
      this._metric(
        'Utilisation',
        `${Math.round(gpu.utilisation_pct)}%`,
        sparkline(hist.t, hist.util, HISTORY_SECONDS, 'jp-mod-util', `${gpuLabel(gpu)} utilisation`)
      ),
      this._metric(
        'Memory',
        `${formatGB(gpu.memory_used_mb)} / ${formatGB(gpu.memory_total_mb)} GB`,
        sparkline(hist.t, hist.memory, HISTORY_SECONDS, 'jp-mod-memory', `${gpuLabel(gpu)} memory`),
        meter(memPct, `${gpuLabel(gpu)} memory used`)
      )
    );
  }

  private _metric(name: string, value: string, ...charts: Element[]): HTMLElement {
    return h(
      'div',
      { class: 'jp-AdaptiveNb-metric' },
      h(
        'div',
        { class: 'jp-AdaptiveNb-metricHead' },
        h('span', { class: 'jp-AdaptiveNb-metricName' }, name),
        h('span', { class: 'jp-AdaptiveNb-metricValue' }, value)
      ),
      ...charts
    );
  }

  private _processes(r: IResources): HTMLElement {
    const rows: HTMLElement[] = [];
    for (const gpu of r.gpus) {
      for (const p of gpu.processes) {
        rows.push(this._processRow(gpu, p));
      }
    }
    return h(
      'section',
      { class: 'jp-AdaptiveNb-section', 'data-section': 'processes' },
      h('h3', {}, 'GPU processes'),
      rows.length === 0
        ? h('div', { class: 'jp-AdaptiveNb-empty' }, 'No process holds GPU memory.')
        : h(
            'table',
            { class: 'jp-AdaptiveNb-table' },
            h(
              'colgroup',
              {},
              h('col', { class: 'jp-mod-gpu' }),
              h('col', { class: 'jp-mod-pid' }),
              h('col', { class: 'jp-mod-mem' }),
              h('col', {})
            ),
            h(
              'thead',
              {},
              h(
                'tr',
                {},
                h('th', {}, 'GPU'),
                h('th', {}, 'PID'),
                h('th', { class: 'jp-mod-num' }, 'Mem'),
                h('th', {}, 'Notebook')
              )
            ),
            h('tbody', {}, rows)
          )
    );
  }

  private _processRow(gpu: IGpu, p: IGpuProcess): HTMLElement {
    return h(
      'tr',
      { 'data-pid': p.pid },
      h('td', {}, gpu.index !== null ? String(gpu.index) : `#${gpu.nvml_index}`),
      h('td', {}, String(p.pid)),
      h('td', { class: 'jp-mod-num' }, `${formatGB(p.memory_mb)} GB`),
      h(
        'td',
        { class: 'jp-AdaptiveNb-owner' },
        p.notebook ? this._link(p.notebook) : h('span', { class: 'jp-AdaptiveNb-dim', title: 'not a kernel of this server' }, 'other process')
      )
    );
  }

  private _host(r: IResources): HTMLElement {
    const hist = this._model.hostHistory;
    const cores = r.cpu.cores;
    return h(
      'section',
      { class: 'jp-AdaptiveNb-section', 'data-section': 'host' },
      h('h3', {}, 'CPU and RAM'),
      h(
        'div',
        { class: 'jp-AdaptiveNb-hostRow', 'data-adaptive': 'cpu' },
        this._metric(
          'CPU',
          `${Math.round(r.cpu.percent)}% of ${cores % 1 === 0 ? cores : cores.toFixed(1)} cores`,
          sparkline(hist.t, hist.util, HISTORY_SECONDS, 'jp-mod-cpu', 'CPU utilisation')
        )
      ),
      h(
        'div',
        { class: 'jp-AdaptiveNb-hostRow', 'data-adaptive': 'ram' },
        this._metric(
          'RAM',
          `${formatGB(r.memory.used_mb)} / ${formatGB(r.memory.total_mb)} GB`,
          sparkline(hist.t, hist.memory, HISTORY_SECONDS, 'jp-mod-memory', 'RAM used'),
          meter(r.memory.percent, 'RAM used')
        )
      )
    );
  }

  private _runs(runs: IRun[]): HTMLElement {
    return h(
      'section',
      { class: 'jp-AdaptiveNb-section', 'data-section': 'runs' },
      h('h3', {}, `Active runs${runs.length ? ` (${runs.length})` : ''}`),
      runs.length === 0
        ? h('div', { class: 'jp-AdaptiveNb-empty' }, 'No adaptive training is running.')
        : runs.map(run => this._run(run))
    );
  }

  private _run(run: IRun): HTMLElement {
    const total = run.total_steps;
    const pct = total ? (100 * run.step) / total : 0;
    const shares = Object.entries(run.shares).filter(
      (e): e is [string, number] => typeof e[1] === 'number' && e[1] > 0
    );
    return h(
      'div',
      { class: 'jp-AdaptiveNb-run', 'data-run': run.run_id },
      h(
        'div',
        { class: 'jp-AdaptiveNb-runTitle' },
        run.notebook ? this._link(run.notebook) : h('span', {}, `process ${run.pid}`),
        run.simulated ? badge('simulated') : null,
        run.paused ? badge('paused', 'jp-mod-paused') : null
      ),
      h(
        'div',
        { class: 'jp-AdaptiveNb-runLine' },
        h(
          'span',
          {},
          total ? `step ${run.step} / ${total}` : `step ${run.step}`,
          run.epochs ? ` · epoch ${run.epoch + 1} / ${run.epochs}` : ''
        ),
        h(
          'span',
          { class: 'jp-AdaptiveNb-rate' },
          `${formatRate(run.samples_per_s ?? 0)} samples/s`
        )
      ),
      total ? meter(pct, 'run progress') : null,
      shares.length > 0 ? sharesBar(shares) : null,
      h(
        'div',
        { class: 'jp-AdaptiveNb-runMeta' },
        `${run.devices.join(', ') || 'cpu'} · policy ${run.policy} · started ${Time.formatHuman(
          new Date(run.started * 1000)
        )}`,
        run.eta_s !== null && run.eta_s !== undefined ? ` · ETA ${formatDuration(run.eta_s)}` : ''
      )
    );
  }

  private _link(path: string): HTMLElement {
    const a = h(
      'a',
      { class: 'jp-AdaptiveNb-link', href: '#', title: `Open ${path}` },
      PathExt.basename(path)
    );
    a.addEventListener('click', event => {
      event.preventDefault();
      this._openPath(path);
    });
    return a;
  }

  private _model: ResourcesModel;
  private _openPath: OpenPath;
}

function gpuLabel(gpu: IGpu): string {
  return gpu.index !== null ? `GPU ${gpu.index}` : `GPU #${gpu.nvml_index}`;
}

function badge(text: string, extra = ''): HTMLElement {
  return h('span', { class: `jp-AdaptiveNb-badge ${extra}`.trim() }, text);
}

function sharesBar(shares: [string, number][]): HTMLElement {
  const total = shares.reduce((s, [, v]) => s + v, 0) || 1;
  return h(
    'div',
    { class: 'jp-AdaptiveNb-shares', title: 'Share of each batch per device' },
    shares.map(([name, v], i) =>
      h(
        'div',
        {
          class: `jp-AdaptiveNb-share jp-mod-c${i % 6}`,
          style: `flex-grow: ${(v / total).toFixed(4)}`,
          title: `${name}: ${Math.round((100 * v) / total)}%`
        },
        `${name} ${Math.round((100 * v) / total)}%`
      )
    )
  );
}

function formatDuration(s: number): string {
  if (s < 60) {
    return `${Math.round(s)} s`;
  }
  if (s < 3600) {
    return `${Math.round(s / 60)} min`;
  }
  return `${(s / 3600).toFixed(1)} h`;
}
