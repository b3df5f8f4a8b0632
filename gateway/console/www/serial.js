// HCP serial console page.
//
// Opened as /console/serial.html?token=TOKEN. Opens the websocket
// /console/serial?token=TOKEN on the same host and shows the VM's first
// serial port in a terminal (xterm.js). What the guest writes arrives as
// binary messages; what is typed goes back as binary messages, byte for
// byte (the guest's shell echoes it).
//
// State for people and tests, as on the VNC page:
//   #status                      what is going on, in words
//   body[data-state]             connecting | connected | disconnected | refused
//   body[data-reason]            the server's close reason, or why we stopped
//   body[data-close-code]        the websocket close code, once closed
//   window.hcpConsoleText()      the terminal's lines (scrollback included)

import { consoleSocketUrl, show, takeToken } from './page.js';
import { Terminal } from './modules/@xterm/xterm/lib/xterm.mjs';
import { FitAddon } from './modules/@xterm/addon-fit/lib/addon-fit.mjs';

const screenEl = document.getElementById('screen');

// The proxy's close codes for a console it would not open: bad request,
// refused token, proxy unavailable.
const REFUSALS = [4400, 4403, 4503];

function start() {
  const token = takeToken();
  if (!token) {
    return;
  }

  const term = new Terminal({
    convertEol: false,
    cursorBlink: true,
    scrollback: 5000,
    fontFamily: 'monospace',
    theme: { background: '#1b1d21' },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(screenEl);
  fit.fit();
  window.addEventListener('resize', () => fit.fit());
  window.hcpConsoleText = () => {
    const buffer = term.buffer.active;
    const lines = [];
    for (let i = 0; i < buffer.length; i++) {
      lines.push(buffer.getLine(i).translateToString(true));
    }
    return lines.join('\n');
  };

  let socket;
  try {
    socket = new WebSocket(consoleSocketUrl('serial', token), ['binary']);
  } catch (err) {
    show('disconnected', `Could not open the console connection: ${err.message}`, err.message);
    return;
  }
  socket.binaryType = 'arraybuffer';
  show('connecting', 'Connecting…');

  const encoder = new TextEncoder();
  socket.addEventListener('open', () => {
    show('connected', 'Connected: serial console', '');
    term.focus();
  });
  socket.addEventListener('message', (event) => {
    if (event.data instanceof ArrayBuffer) {
      term.write(new Uint8Array(event.data));
    } else {
      term.write(event.data);
    }
  });
  term.onData((data) => {
    if (socket.readyState === WebSocket.OPEN) {
      socket.send(encoder.encode(data));
    }
  });
  socket.addEventListener('close', (event) => {
    document.body.dataset.closeCode = String(event.code);
    const reason = event.reason || '';
    // The proxy accepts the websocket and then closes it with one of these
    // to turn a token away (a serial line says nothing when it is opened,
    // so "open" alone does not tell a session that ran).
    if (REFUSALS.includes(event.code)) {
      const why = reason || `close code ${event.code}`;
      show('refused', `Console refused: ${why}`, why);
    } else {
      const why = reason || (event.wasClean ? 'session ended' : 'connection lost');
      show('disconnected', `Disconnected: ${why}`, why);
    }
    term.options.cursorBlink = false;
  });
}

start();
