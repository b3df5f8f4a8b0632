// HCP VM console page.
//
// Opened as /console/vnc.html?token=TOKEN. Opens the websocket
// /console/vnc?token=TOKEN on the same host (ws: under http:, wss: under
// https:) and shows the VM's screen with noVNC. The gateway's proxy has
// already authenticated to the VM's VNC server and offers security type None,
// so no password is asked for here.
//
// State for people and tests:
//   #status                      what is going on, in words
//   body[data-state]             connecting | connected | disconnected | refused
//   body[data-reason]            the server's close reason, or why we stopped
//   body[data-close-code]        the websocket close code, once closed
//   document.title               "HCP console: <status text>"
//
// "refused" means the server closed the websocket with a code in 4000-4999
// before the VNC session was up, which is how the proxy turns a token away
// (e.g. 4403 "console token already used").

import { consoleSocketUrl, isRefusal, show, takeToken } from './page.js';
import RFB from './novnc/core/rfb.js';

const screenEl = document.getElementById('screen');
const cadButton = document.getElementById('cad');

function start() {
  const token = takeToken();
  if (!token) {
    return;
  }

  let socket;
  try {
    // noVNC accepts a WebSocket object instead of a URL. Opening it here lets
    // us read the close code and reason, which noVNC's own "disconnect" event
    // does not pass on. (RFB's wsProtocols option only applies when it opens
    // the socket itself, so the subprotocol is given here.)
    socket = new WebSocket(consoleSocketUrl('vnc', token), ['binary']);
  } catch (err) {
    show('disconnected', `Could not open the console connection: ${err.message}`, err.message);
    return;
  }

  // Registered before noVNC attaches its handlers, so this runs first and the
  // close details are known when noVNC reports the disconnect.
  let closed = null;
  socket.addEventListener('close', (event) => {
    closed = { code: event.code, reason: event.reason };
    document.body.dataset.closeCode = String(event.code);
  });

  let connected = false;
  let desktopName = '';
  let securityFailure = null;
  let credentialsAsked = false;

  show('connecting', 'Connecting…');

  const rfb = new RFB(screenEl, socket, { shared: true });
  rfb.scaleViewport = true;   // fit the VM's screen to the window
  rfb.resizeSession = false;  // never change the guest's resolution
  rfb.background = '#1b1d21';

  rfb.addEventListener('desktopname', (event) => {
    desktopName = event.detail.name || '';
  });

  rfb.addEventListener('connect', () => {
    connected = true;
    cadButton.disabled = false;
    show('connected', desktopName ? `Connected: ${desktopName}` : 'Connected', '');
    rfb.focus();
  });

  rfb.addEventListener('securityfailure', (event) => {
    securityFailure = event.detail.reason || `security failure (status ${event.detail.status})`;
  });

  rfb.addEventListener('credentialsrequired', () => {
    // The proxy should have authenticated already; asking the user for the
    // VM's VNC password would be wrong, so give up and say so.
    credentialsAsked = true;
    rfb.disconnect();
  });

  rfb.addEventListener('disconnect', (event) => {
    cadButton.disabled = true;
    const code = closed ? closed.code : null;
    const reason = closed && closed.reason ? closed.reason : '';

    if (!connected && code !== null && isRefusal(code)) {
      const why = reason || `close code ${code}`;
      show('refused', `Console refused: ${why}`, why);
    } else if (credentialsAsked) {
      show('disconnected', 'The VM console asked for a password; the gateway did not log in for us.',
        'credentials required');
    } else if (securityFailure) {
      show('disconnected', `Console authentication failed: ${securityFailure}`, securityFailure);
    } else if (connected) {
      const why = reason || (event.detail.clean ? 'session ended' : 'connection lost');
      show('disconnected', `Disconnected: ${why}`, why);
    } else {
      const why = reason || (code !== null ? `connection closed (code ${code})` : 'connection failed');
      show('disconnected', `Could not connect to the console: ${why}`, why);
    }
  });

  cadButton.addEventListener('click', () => {
    rfb.sendCtrlAltDel();
    rfb.focus();
  });
}

start();
