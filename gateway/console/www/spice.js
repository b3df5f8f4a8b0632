// HCP VM console page for SPICE.
//
// Opened as /console/spice.html?token=TOKEN. spice-html5 (Debian's package,
// served by the gateway at /console/spice-html5/) opens the websocket
// /console/spice?token=TOKEN on the same host for the main channel and one
// more per channel it learns of (display, inputs, cursor, ...), all with the
// same token: the gateway's proxy admits them as one session from this
// client. The proxy replaces the ticket with the VM's SPICE password, so the
// page has none to give (spice-html5 sends a ticket of an empty password,
// which the proxy drops).
//
// State for people and tests, as on vnc.html:
//   #status                      what is going on, in words
//   body[data-state]             connecting | connected | disconnected | refused
//   body[data-reason]            the server's close reason, or why we stopped
//   body[data-close-code]        the main channel's websocket close code
//   document.title               "HCP console: <status text>"
//   #screen canvas               the VM's screen (spice-html5's surface)
//
// "refused" means the server closed the main channel with a code in
// 4000-4999 before the session was up: how the proxy turns a token away
// (e.g. 4403 "console token already used").

import { consoleSocketUrl, isRefusal, show, takeToken } from './page.js';
import { SpiceMainConn, sendCtrlAltDel } from './spice-html5/main.js';

const cadButton = document.getElementById('cad');

function start() {
  const token = takeToken();
  if (!token) {
    return;
  }

  let connected = false;
  let closed = null;
  let failure = '';

  function ended() {
    cadButton.disabled = true;
    const code = closed ? closed.code : null;
    const reason = closed && closed.reason ? closed.reason : '';
    if (!connected && code !== null && isRefusal(code)) {
      const why = reason || `close code ${code}`;
      show('refused', `Console refused: ${why}`, why);
    } else if (connected) {
      const why = reason || failure || 'session ended';
      show('disconnected', `Disconnected: ${why}`, why);
    } else {
      const why = reason || failure || (code !== null ? `connection closed (code ${code})` : 'connection failed');
      show('disconnected', `Could not connect to the console: ${why}`, why);
    }
  }

  show('connecting', 'Connecting…');
  let sc;
  try {
    sc = new SpiceMainConn({
      uri: consoleSocketUrl('spice', token),
      screen_id: 'screen',
      password: '',
      onerror: (err) => {
        failure = err && err.message ? err.message : String(err);
        // A close reports itself below, with the server's code and reason.
        if (!closed && sc && sc.ws && sc.ws.readyState !== WebSocket.CLOSED) {
          sc.stop();
        }
      },
      onsuccess: () => {
        connected = true;
        cadButton.disabled = false;
        show('connected', 'Connected', '');
      },
    });
  } catch (err) {
    show('disconnected', `Could not open the console connection: ${err.message}`, err.message);
    return;
  }
  // The main channel's socket: its close code and reason are the session's.
  sc.ws.addEventListener('close', (event) => {
    closed = { code: event.code, reason: event.reason };
    document.body.dataset.closeCode = String(event.code);
    ended();
  });

  cadButton.addEventListener('click', () => sendCtrlAltDel(sc));
}

start();
