/**
 * Status bar item: `GPU 2/4 busy · 1 run · 812 samples/s` (CPU and RAM without GPUs).
 * Clicking it opens the sidebar panel.
 */
import { Widget } from '@lumino/widgets';

import { ResourcesModel } from './model';

export class ResourcesStatus extends Widget {
  constructor(model: ResourcesModel, onClick: () => void) {
    super({ node: document.createElement('div') });
    this._model = model;
    this.addClass('jp-AdaptiveNb-status');
    this.node.title = 'Adaptive resources: click to open the panel';
    this.node.setAttribute('role', 'button');
    this.node.tabIndex = 0;
    this.node.addEventListener('click', onClick);
    this.node.addEventListener('keydown', event => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        onClick();
      }
    });
    this._model.changed.connect(this._update, this);
    this._update();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._model.changed.disconnect(this._update, this);
    super.dispose();
  }

  private _update(): void {
    this.node.textContent = this._model.summary();
  }

  private _model: ResourcesModel;
}
