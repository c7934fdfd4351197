/**
 * The polled model shared by the sidebar panel and the status bar item.
 */
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { IResources, IRun, IRuns, requestAPI } from './api';

/** Seconds of history each sparkline shows. */
export const HISTORY_SECONDS = 60;

/** Utilisation (%) from which a GPU counts as busy. */
export const BUSY_UTIL_PCT = 10;

/** Recent utilisation and memory (%) of one GPU, with sample times (s), oldest first. */
export interface IGpuHistory {
  t: number[];
  util: number[];
  memory: number[];
}

/**
 * Polls the server extension. It polls fast while the panel is visible, slowly for the
 * status bar otherwise, and stands by while the browser tab is hidden.
 */
export class ResourcesModel {
  constructor(options: ResourcesModel.IOptions = {}) {
    this._fast = options.fastIntervalMs ?? 1000;
    this._slow = options.slowIntervalMs ?? 5000;
    this._poll = new Poll({
      auto: true,
      factory: () => this._refresh(),
      frequency: { interval: this._slow, backoff: true, max: 60_000 },
      name: 'adaptive-nb:resources',
      standby: () => document.hidden || !this._wanted()
    });
  }

  /** Emitted after each poll (successful or not). */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get resources(): IResources | null {
    return this._resources;
  }

  get runs(): IRun[] {
    return this._runs;
  }

  /** The last error message, or null after a successful poll. */
  get error(): string | null {
    return this._error;
  }

  history(uuid: string): IGpuHistory {
    return this._history.get(uuid) ?? { t: [], util: [], memory: [] };
  }

  /** Recent CPU (`util`) and RAM (`memory`) percentages. */
  get hostHistory(): IGpuHistory {
    return this._host;
  }

  /** Poll fast (the panel is visible) or slowly (only the status bar needs data). */
  set detailed(value: boolean) {
    if (value === this._detailed) {
      return;
    }
    this._detailed = value;
    this._poll.frequency = {
      ...this._poll.frequency,
      interval: value ? this._fast : this._slow
    };
    if (value) {
      void this._poll.refresh();
    }
  }

  get detailed(): boolean {
    return this._detailed;
  }

  /** A callback telling whether anything shows the data right now. */
  set wanted(fn: () => boolean) {
    this._wanted = fn;
  }

  refresh(): Promise<void> {
    return this._poll.refresh();
  }

  /** A short summary, e.g. `GPU 2/4 busy · 1 run · 812 samples/s`. */
  summary(): string {
    const r = this._resources;
    if (!r) {
      return this._error ? 'Resources unavailable' : 'Resources…';
    }
    const parts: string[] = [];
    if (r.gpus.length > 0) {
      const busy = r.gpus.filter(
        g => g.utilisation_pct >= BUSY_UTIL_PCT || g.processes.length > 0
      ).length;
      parts.push(`GPU ${busy}/${r.gpus.length} busy`);
    } else {
      parts.push(`CPU ${Math.round(r.cpu.percent)}%`);
      parts.push(
        `RAM ${formatGB(r.memory.used_mb)}/${formatGB(r.memory.total_mb)} GB`
      );
    }
    const n = this._runs.length;
    if (n > 0) {
      parts.push(`${n} run${n === 1 ? '' : 's'}`);
      const rate = this._runs.reduce((s, run) => s + (run.samples_per_s ?? 0), 0);
      parts.push(`${formatRate(rate)} samples/s`);
    }
    return parts.join(' · ');
  }

  dispose(): void {
    this._poll.dispose();
    Signal.clearData(this);
  }

  private async _refresh(): Promise<void> {
    try {
      const [resources, runs] = await Promise.all([
        requestAPI<IResources>('resources'),
        requestAPI<IRuns>('runs')
      ]);
      this._resources = resources;
      this._runs = runs.runs;
      this._error = null;
      this._record(resources);
    } catch (reason) {
      this._error = reason instanceof Error ? reason.message : String(reason);
      this._changed.emit();
      throw reason; // lets the poll back off
    }
    this._changed.emit();
  }

  private _record(resources: IResources): void {
    push(this._host, resources.time, resources.cpu.percent, resources.memory.percent);
    const seen = new Set<string>();
    for (const gpu of resources.gpus) {
      seen.add(gpu.uuid);
      let h = this._history.get(gpu.uuid);
      if (!h) {
        h = { t: [], util: [], memory: [] };
        this._history.set(gpu.uuid, h);
      }
      push(
        h,
        resources.time,
        gpu.utilisation_pct,
        gpu.memory_total_mb > 0
          ? (100 * gpu.memory_used_mb) / gpu.memory_total_mb
          : 0
      );
    }
    for (const uuid of Array.from(this._history.keys())) {
      if (!seen.has(uuid)) {
        this._history.delete(uuid);
      }
    }
  }

  private _changed = new Signal<this, void>(this);
  private _detailed = false;
  private _error: string | null = null;
  private _fast: number;
  private _history = new Map<string, IGpuHistory>();
  private _host: IGpuHistory = { t: [], util: [], memory: [] };
  private _poll: Poll;
  private _resources: IResources | null = null;
  private _runs: IRun[] = [];
  private _slow: number;
  private _wanted: () => boolean = () => true;
}

export namespace ResourcesModel {
  export interface IOptions {
    fastIntervalMs?: number;
    slowIntervalMs?: number;
  }
}

function push(h: IGpuHistory, t: number, util: number, memory: number): void {
  h.t.push(t);
  h.util.push(util);
  h.memory.push(memory);
  while (h.t.length > 0 && h.t[0] < t - HISTORY_SECONDS - 5) {
    h.t.shift();
    h.util.shift();
    h.memory.shift();
  }
}

/** Megabytes as gigabytes with one decimal. */
export function formatGB(mb: number): string {
  return (mb / 1024).toFixed(1);
}

/** A throughput with no more precision than it deserves. */
export function formatRate(rate: number): string {
  if (rate >= 100) {
    return Math.round(rate).toLocaleString('en-US');
  }
  return rate.toFixed(rate >= 10 ? 0 : 1);
}
