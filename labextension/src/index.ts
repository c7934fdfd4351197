/**
 * adaptive-nb: the "Adaptive resources" sidebar, a status bar item and a palette command.
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { ResourcesModel } from './model';
import { ResourcesPanel } from './panel';
import { ResourcesStatus } from './statusbar';

import iconSvg from '../style/icon.svg';

/** Command ids. */
export namespace CommandIDs {
  export const show = 'adaptive-nb:show-resources';
}

export const resourcesIcon = new LabIcon({
  name: 'adaptive-nb:resources',
  svgstr: iconSvg
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'adaptive-nb:resources',
  description: 'GPUs, CPU/RAM, which notebook uses which GPU, and active adaptive runs.',
  autoStart: true,
  optional: [ICommandPalette, ILayoutRestorer, IStatusBar, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    statusBar: IStatusBar | null,
    labShell: ILabShell | null
  ) => {
    const model = new ResourcesModel();
    const panel = new ResourcesPanel(model, path => {
      void app.commands.execute('docmanager:open', { path });
    });
    panel.title.icon = resourcesIcon;
    app.shell.add(panel, 'left', { rank: 1000 });
    restorer?.add(panel, 'adaptive-nb-resources');

    let status: ResourcesStatus | null = null;
    model.wanted = () => panel.isVisible || (status !== null && status.isVisible);

    app.commands.addCommand(CommandIDs.show, {
      label: 'Show Adaptive resources',
      caption: 'Open the Adaptive resources sidebar (GPUs, CPU/RAM, runs)',
      icon: resourcesIcon,
      execute: () => {
        if (labShell) {
          labShell.expandLeft();
        }
        app.shell.activateById(panel.id);
      }
    });
    palette?.addItem({ command: CommandIDs.show, category: 'Adaptive' });

    if (statusBar) {
      status = new ResourcesStatus(model, () => {
        void app.commands.execute(CommandIDs.show);
      });
      statusBar.registerStatusItem('adaptive-nb:status', {
        item: status,
        align: 'left',
        rank: 5
      });
    }
    void model.refresh();
  }
};

export default plugin;
