/**
 * Types and fetch helpers for the adaptive_nb server extension's JSON API.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** A compute process on a GPU (pid, memory and, when known, its notebook). */
export interface IGpuProcess {
  pid: number;
  memory_mb: number;
  kernel_id: string | null;
  notebook: string | null;
}

/** One GPU reading. */
export interface IGpu {
  index: number | null;
  nvml_index: number;
  uuid: string;
  name: string;
  simulated: boolean;
  utilisation_pct: number;
  memory_used_mb: number;
  memory_total_mb: number;
  processes: IGpuProcess[];
}

/** `GET /adaptive-nb/api/resources`. */
export interface IResources {
  time: number;
  sample_age_s: number;
  gpu_available: boolean;
  notice: string | null;
  gpus: IGpu[];
  cpu: { percent: number; per_core_percent: number[]; cores: number };
  memory: {
    used_mb: number;
    available_mb: number;
    total_mb: number;
    percent: number;
  };
}

/** One active `%%adaptive_train` run. */
export interface IRun {
  run_id: string;
  kernel_id: string | null;
  notebook: string | null;
  pid: number;
  step: number;
  total_steps: number | null;
  epoch: number;
  epochs: number | null;
  samples_per_s: number | null;
  eta_s: number | null;
  loss: number | null;
  devices: string[];
  shares: { [device: string]: number | null };
  policy: string;
  simulated: boolean;
  paused: boolean;
  started: number;
  updated: number;
}

/** `GET /adaptive-nb/api/runs`. */
export interface IRuns {
  runs: IRun[];
}

/** Fetch `endpoint` below `adaptive-nb/api/` as JSON (with the server's auth). */
export async function requestAPI<T>(endpoint: string): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'adaptive-nb', 'api', endpoint);
  const response = await ServerConnection.makeRequest(url, {}, settings);
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response);
  }
  return (await response.json()) as T;
}
