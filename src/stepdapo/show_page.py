"""The CSS and JS of `stepdapo show`'s page (show.py writes the page around them).

Plain ES2017 and CSS, no library, no network. The script reads the JSON data element and builds
every element with createElement / textContent (never innerHTML from data); colours are set through
the CSSOM (element.style), which the page's Content-Security-Policy allows, where a style attribute
in markup would not be. The view (tab, filters, sort, page) lives in the URL's #fragment, so a view
can be bookmarked or opened directly (e.g. show.html#view=states&sort=gap).

Both strings must stay ASCII (non-ASCII characters as JS escapes): the page's CSP holds their hashes.
"""

CSS = r"""
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dde5; --bg: #f6f7f9; --accent: #2b5fb3; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { padding: 12px 20px 6px; background: #fff; border-bottom: 1px solid var(--line); }
h1 { font-size: 18px; margin: 0 0 6px; }
h1 small { font-weight: normal; color: var(--muted); font-size: 13px; }
.cards { display: flex; gap: 10px; flex-wrap: wrap; margin: 6px 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 5px 10px; background: #fbfcfd; font-size: 12.5px; }
.card b { font-size: 13px; }
.card .warn, .warnings { color: #9a3412; }
.warnings { font-size: 12.5px; margin: 4px 0; }
.warnings summary { cursor: pointer; }
.warnings ul { margin: 2px 0; padding-left: 22px; }
nav { display: flex; gap: 4px; margin-top: 8px; }
nav button { border: 1px solid var(--line); border-bottom: none; background: var(--bg); padding: 6px 14px;
             border-radius: 6px 6px 0 0; cursor: pointer; font: inherit; }
nav button.on { background: var(--accent); color: #fff; border-color: var(--accent); }
.controls { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; padding: 8px 20px;
            background: #fff; border-bottom: 1px solid var(--line); }
.controls label { color: var(--muted); font-size: 12.5px; }
.controls select, .controls input, .controls button { font: inherit; font-size: 13px; }
.controls input[type=search] { width: 16em; }
.controls input[type=number] { width: 4.5em; }
.presets button { border: 1px solid var(--accent); color: var(--accent); background: #fff; border-radius: 12px;
                  padding: 2px 10px; cursor: pointer; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; color: var(--muted); padding: 6px 20px 0; flex-wrap: wrap; }
.bar { width: 180px; height: 12px; border: 1px solid var(--line); border-radius: 3px; }
.swatch { display: inline-block; width: 14px; height: 12px; vertical-align: middle; border: 1px solid var(--line); }
.status { padding: 6px 20px; font-size: 12.5px; color: var(--muted); display: flex; gap: 10px; align-items: center; }
.status button { font: inherit; font-size: 12px; }
main { padding: 0 20px 30px; }
table.rows { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
table.rows th { position: sticky; top: 0; background: #eef1f5; text-align: left; font-size: 12px; padding: 5px 6px;
                border-bottom: 1px solid var(--line); white-space: nowrap; }
table.rows th.sortable { cursor: pointer; color: var(--accent); }
table.rows th.sorted::after { content: " \25BE"; }
table.rows th.sorted.asc::after { content: " \25B4"; }
table.rows td { border-top: 1px solid var(--line); padding: 5px 6px; vertical-align: top; font-size: 13px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.q { max-width: 260px; }
.pid { color: var(--muted); font-size: 11px; font-family: ui-monospace, monospace; }
.step { display: flex; gap: 6px; align-items: flex-start; margin: 1px 0; }
.val { font: 11px ui-monospace, monospace; color: var(--muted); min-width: 3.6em; text-align: right; padding-top: 2px; }
.txt { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; white-space: pre-wrap; word-break: break-word;
       padding: 0 4px; border-radius: 3px; border: 1px solid transparent; }
.txt.none { border: 1px dashed #b8bec9; }
.txt.wrong { text-decoration: underline wavy #c81e1e; text-underline-offset: 3px; }
.txt.missed { border: 2px solid #c81e1e; }
.badge { font-size: 10.5px; border-radius: 8px; padding: 0 6px; margin-left: 4px; white-space: nowrap; }
.badge.miss { background: #c81e1e; color: #fff; }
.badge.ok { background: #dcfce7; color: #166534; }
.badge.bad { background: #fee2e2; color: #991b1b; }
.prefix { font-family: ui-monospace, monospace; white-space: pre-wrap; color: var(--muted); font-size: 12px; }
.acts { display: flex; flex-direction: column; gap: 2px; }
.act { display: flex; gap: 6px; align-items: flex-start; }
.cell { display: inline-block; min-width: 3.4em; text-align: right; border-radius: 3px; padding: 0 4px; }
#report { background: #fff; border: 1px solid var(--line); padding: 8px 16px; }
table.report { border-collapse: collapse; margin: 6px 0 12px; font-size: 12.5px; }
table.report th, table.report td { border: 1px solid var(--line); padding: 3px 6px; }
table.report th { background: #eef1f5; }
.scroll { overflow-x: auto; }
figure { display: inline-block; margin: 6px 12px 6px 0; }
figure img { max-width: 560px; border: 1px solid var(--line); }
figcaption { font-size: 11px; color: var(--muted); }
.hidden { display: none !important; }
"""

JS = r"""
'use strict';
(function () {
  var D = JSON.parse(document.getElementById('data').textContent);
  var QUANT = {v: 'critic value V(s)', mc: 'Monte-Carlo label MC(s)', dv: 'critic step change \u0394V', a: 'DAPO advantage A'};
  var STEP_INDEX = {mc: 1, v: 2, dv: 3, a: 4};
  var DEFAULTS = {view: 'solutions', it: 'all', colour: 'v', q: '', outcome: 'all', missed: '0', thr: '0.5',
                  kept: '0', sort: '', desc: '', page: '0'};
  var PAGE = 50;
  var state = {};

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(x, signed) {
    if (x === null || x === undefined) return '\u2014';
    var s = x.toFixed(2);
    return signed && x > 0 ? '+' + s : s;
  }
  // [0, 1] red -> yellow -> green; [-1, 1] red <- white -> green
  function colour(x, diverging) {
    if (x === null || x === undefined) return '#f1f2f4';
    if (diverging) {
      var m = Math.max(-1, Math.min(1, x));
      var light = 97 - 45 * Math.abs(m);
      return 'hsl(' + (m >= 0 ? 130 : 0) + ', 70%, ' + light + '%)';
    }
    var v = Math.max(0, Math.min(1, x));
    return 'hsl(' + Math.round(v * 120) + ', 75%, ' + (80 - 8 * Math.abs(v - 0.5)) + '%)';
  }
  function diverging(q) { return q === 'dv' || q === 'a'; }

  // -- derived fields, once ------------------------------------------------------------------------
  D.solutions.forEach(function (s, i) {
    s.idx = i;
    var wrong = 0, mindv = null, text = [s.p, D.questions[s.p] || ''];
    s.s.forEach(function (st) {
      text.push(st[0]);
      if (st[5] === false) wrong += 1;
      if (st[3] !== null && (mindv === null || st[3] < mindv)) mindv = st[3];
    });
    s.wrong = wrong; s.mindv = mindv; s.text = text.join('\n').toLowerCase();
  });
  D.states.forEach(function (s, i) {
    s.idx = i;
    s.err = (s.v === null || s.mc === null) ? null : Math.abs(s.v - s.mc);
    var sol = D.solutions[s.sol];
    var text = [s.p, D.questions[s.p] || ''];
    for (var t = 0; t < s.d; t++) text.push(sol.s[t][0]);
    s.acts.forEach(function (a) { text.push(a[0]); });
    s.text = text.join('\n').toLowerCase();
  });
  function missedSteps(s, thr) {
    var n = 0;
    s.s.forEach(function (st) { if (st[5] === false && st[2] !== null && st[2] >= thr) n += 1; });
    return n;
  }

  // -- the view in the URL fragment ----------------------------------------------------------------
  function readHash() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ''));
    state = {};
    Object.keys(DEFAULTS).forEach(function (k) { state[k] = p.has(k) ? p.get(k) : DEFAULTS[k]; });
    if (['solutions', 'states', 'report'].indexOf(state.view) < 0) state.view = 'solutions';
    if (!STEP_INDEX[state.colour]) state.colour = 'v';
    if (!isFinite(parseFloat(state.thr))) state.thr = DEFAULTS.thr;
    if (!(parseInt(state.page, 10) >= 0)) state.page = '0';
  }
  function go(changes, keepPage) {
    var next = Object.assign({}, state, changes);
    if (!keepPage) next.page = '0';
    var p = new URLSearchParams();
    Object.keys(DEFAULTS).forEach(function (k) { if (next[k] !== DEFAULTS[k]) p.set(k, next[k]); });
    var h = p.toString();
    if (('#' + h) === location.hash || (h === '' && location.hash === '')) { state = next; render(); }
    else location.hash = h;
  }

  // -- the fixed parts -----------------------------------------------------------------------------
  var header = el('header');
  var h1 = el('h1', null, 'stepdapo show: ' + D.run + ' ');
  h1.appendChild(el('small', null, 'task ' + D.task + '; up to ' + D.limit + ' solutions per iteration'));
  header.appendChild(h1);
  var cards = el('div', 'cards');
  D.iterations.forEach(function (it) {
    var c = el('div', 'card');
    c.appendChild(el('b', null, 'iteration ' + it.k));
    c.appendChild(el('div', null, it.solutions_shown + ' of ' + it.solutions_total + ' solutions (' + it.distinct_shown +
      ' distinct, ' + it.problems_shown + ' of ' + it.problems_total + ' problems); ' + it.states_shown + ' of ' +
      it.states_total + ' states, ' + it.states_kept_shown + ' kept'));
    c.appendChild(el('div', null, 'critic: ' + (it.critic || 'none') + (it.critic_values ? '' : ' (no values)') +
      '; advantages from ' + (it.adv_source || 'n/a') + ', min gap ' + it.min_gap +
      (it.accuracy !== null && it.accuracy !== undefined ? '; greedy test accuracy after: ' + (100 * it.accuracy).toFixed(1) + '%' : '')));
    if (it.critic_warning) c.appendChild(el('div', 'warn', 'critic check: ' + it.critic_warning));
    cards.appendChild(c);
  });
  header.appendChild(cards);
  if (D.warnings.length) {
    var box = el('details', 'warnings');
    box.appendChild(el('summary', null, D.warnings.length + (D.warnings.length > 1 ? ' warnings' : ' warning')));
    var ul = el('ul');
    D.warnings.forEach(function (w) { ul.appendChild(el('li', null, w)); });
    box.appendChild(ul);
    header.appendChild(box);
  }
  var nav = el('nav');
  var tabs = {};
  [['solutions', 'Solutions'], ['states', 'States'], ['report', 'Report']].forEach(function (t) {
    var b = el('button', null, t[1]);
    b.id = 'tab-' + t[0];
    b.addEventListener('click', function () { go({view: t[0], sort: '', desc: ''}); });
    tabs[t[0]] = b;
    nav.appendChild(b);
  });
  header.appendChild(nav);
  document.body.appendChild(header);

  var controls = el('div', 'controls');
  function control(labelText, input, cls) {
    var l = el('label', cls, labelText + ' ');
    l.appendChild(input);
    controls.appendChild(l);
    return l;
  }
  function select(options, key) {
    var s = el('select');
    s.id = 'f-' + key;
    options.forEach(function (o) { var op = el('option', null, o[1]); op.value = o[0]; s.appendChild(op); });
    s.addEventListener('change', function () { var c = {}; c[key] = s.value; go(c); });
    return s;
  }
  var fIt = select([['all', 'all']].concat(D.iterations.map(function (it) { return [String(it.k), String(it.k)]; })), 'it');
  control('iteration', fIt, 'c-rows');
  var fColour = select(Object.keys(QUANT).map(function (k) { return [k, QUANT[k]]; }), 'colour');
  control('colour by', fColour, 'c-rows');
  var fQ = el('input');
  fQ.type = 'search'; fQ.id = 'f-q'; fQ.placeholder = 'problem id or text';
  var qTimer = null;
  fQ.addEventListener('input', function () {
    clearTimeout(qTimer);
    qTimer = setTimeout(function () { go({q: fQ.value}); }, 250);
  });
  control('search', fQ, 'c-rows');
  var fOutcome = select([['all', 'all'], ['correct', 'correct'], ['wrong', 'incorrect']], 'outcome');
  control('solutions', fOutcome, 'c-sol');
  var fMissed = el('input');
  fMissed.type = 'checkbox'; fMissed.id = 'f-missed';
  fMissed.addEventListener('change', function () { go({missed: fMissed.checked ? '1' : '0'}); });
  control('wrong steps the critic missed', fMissed, 'c-sol');
  var fThr = el('input');
  fThr.type = 'number'; fThr.id = 'f-thr'; fThr.min = '0'; fThr.max = '1'; fThr.step = '0.05';
  fThr.addEventListener('change', function () { go({thr: fThr.value}); });
  control('(V after the step \u2265', fThr, 'c-sol').appendChild(document.createTextNode(')'));
  var fKept = el('input');
  fKept.type = 'checkbox'; fKept.id = 'f-kept';
  fKept.addEventListener('change', function () { go({kept: fKept.checked ? '1' : '0'}); });
  control('kept states only (gap \u2265 min gap)', fKept, 'c-st');
  var presets = el('span', 'presets c-rows');
  [['Wrong steps the critic missed', {view: 'solutions', missed: '1', sort: '', desc: ''}],
   ['Largest advantage gap', {view: 'states', kept: '1', sort: 'gap', desc: '1'}],
   ['Critic vs Monte-Carlo', {view: 'states', kept: '0', sort: 'err', desc: '1'}]].forEach(function (p) {
    var b = el('button', null, p[0]);
    b.addEventListener('click', function () { go(p[1]); });
    presets.appendChild(b);
  });
  if (!D.step_checks) fMissed.disabled = true;
  controls.appendChild(presets);
  document.body.appendChild(controls);

  var legend = el('div', 'legend');
  document.body.appendChild(legend);
  var status = el('div', 'status');
  status.id = 'status';
  document.body.appendChild(status);
  var main = el('main');
  document.body.appendChild(main);
  var report = el('div');
  report.id = 'report';
  report.appendChild(document.importNode(document.getElementById('report').content, true));

  function drawLegend() {
    legend.textContent = '';
    if (state.view === 'report') return;
    var q = state.colour, div = diverging(q);
    legend.appendChild(el('span', null, (state.view === 'states' ? 'sampled next steps' : 'steps') + ' coloured by ' +
      (state.view === 'states' ? {v: 'stored value v(s+a)', mc: 'fraction of their rollouts ending correct',
                                  dv: 'DAPO advantage A', a: 'DAPO advantage A'}[q] : QUANT[q]) + ':'));
    legend.appendChild(el('span', null, div ? '\u22121' : '0'));
    var bar = el('span', 'bar');
    var stops = [];
    for (var i = 0; i <= 10; i++) stops.push(colour(div ? -1 + i / 5 : i / 10, div));
    bar.style.background = 'linear-gradient(to right, ' + stops.join(', ') + ')';
    legend.appendChild(bar);
    legend.appendChild(el('span', null, div ? '+1' : '1'));
    var sw = el('span', 'swatch');
    sw.style.background = colour(null);
    sw.style.borderStyle = 'dashed';
    legend.appendChild(sw);
    legend.appendChild(el('span', null, 'no value'));
    if (state.view === 'solutions') {
      var w = el('span', 'txt wrong', 'wavy underline');
      legend.appendChild(w);
      legend.appendChild(el('span', null, 'a step the task judges wrong'));
      var m = el('span', 'txt missed', 'red box');
      legend.appendChild(m);
      legend.appendChild(el('span', null, 'a wrong step the critic missed (V after it \u2265 ' + state.thr + ')'));
    }
  }

  // -- rows ---------------------------------------------------------------------------------------
  function matchIt(r) { return state.it === 'all' || String(r.i) === state.it; }
  function matchQ(r) { return !state.q || r.text.indexOf(state.q.toLowerCase()) >= 0; }
  function compare(key, desc) {
    return function (a, b) {
      var x = a[key], y = b[key];
      var nx = x === null || x === undefined, ny = y === null || y === undefined;
      if (nx || ny) return nx === ny ? a.idx - b.idx : (nx ? 1 : -1);  // no value: last either way
      if (x < y) return desc ? 1 : -1;
      if (x > y) return desc ? -1 : 1;
      return a.idx - b.idx;
    };
  }
  function headerRow(cols, defaultSort, defaultDesc) {
    var tr = el('tr');
    var sort = state.sort || defaultSort;
    var desc = state.sort ? state.desc === '1' : defaultDesc;
    cols.forEach(function (c) {
      var th = el('th', null, c[0]);
      if (c[1]) {
        th.classList.add('sortable');
        th.dataset.sort = c[1];
        if (sort === c[1]) { th.classList.add('sorted'); if (!desc) th.classList.add('asc'); }
        th.addEventListener('click', function () {
          go({sort: c[1], desc: sort === c[1] ? (desc ? '' : '1') : (c[2] ? '1' : '')});
        });
      }
      if (c[3]) th.title = c[3];
      tr.appendChild(th);
    });
    var thead = el('thead');
    thead.appendChild(tr);
    return thead;
  }
  function rowStart(r, kind) {  // a table row's data attributes (the filters read them), iteration and problem
    var tr = el('tr');
    tr.dataset.kind = kind;
    tr.dataset.iter = String(r.i);
    tr.dataset.problem = r.p;
    tr.appendChild(el('td', 'num', r.i));
    tr.appendChild(problemCell(r));
    return tr;
  }
  function problemCell(r) {
    var td = el('td', 'q');
    td.appendChild(el('div', 'pid', r.p));
    td.appendChild(el('div', null, D.questions[r.p] || ''));
    return td;
  }
  function stepTitle(st, last) {
    return 'MC ' + fmt(st[1]) + (last ? ' (verifier)' : '') + ' \u00b7 V ' + fmt(st[2]) + ' \u00b7 \u0394V ' +
      fmt(st[3], true) + ' \u00b7 A ' + fmt(st[4], true) + (st[4] === null ? ' (not a sampled action of a kept state)' : '') +
      ' \u00b7 task: ' + (st[5] === null ? 'not judged' : st[5] ? 'right' : 'wrong');
  }
  function numCell(x, signed, tint) {
    var td = el('td', 'num');
    var c = el('span', 'cell', fmt(x, signed));
    if (tint) c.style.background = colour(x, signed);
    td.appendChild(c);
    return td;
  }

  function solutionRows() {
    var thr = parseFloat(state.thr);
    var rows = D.solutions.filter(function (r) {
      if (!matchIt(r) || !matchQ(r)) return false;
      if (state.outcome === 'correct' && !r.ok) return false;
      if (state.outcome === 'wrong' && r.ok) return false;
      r.missed = missedSteps(r, thr);
      return state.missed !== '1' || r.missed > 0;
    });
    var key = state.sort || 'i';
    rows.sort(compare(key, state.desc === '1'));
    return rows;
  }
  function solutionTable(rows) {
    var q = STEP_INDEX[state.colour], div = diverging(state.colour), thr = parseFloat(state.thr);
    var table = el('table', 'rows');
    table.id = 'rows';
    table.appendChild(headerRow([['iter', 'i'], ['problem', 'p'], ['solution: each step coloured by ' + QUANT[state.colour]],
      ['result', 'ok'], ['\u00d7', 'n', true, 'identical samples'], ['wrong', 'wrong', true, 'steps the task judges wrong'],
      ['missed', 'missed', true, 'wrong steps with V after them \u2265 the threshold'],
      ['min \u0394V', 'mindv', false, 'the largest drop of the critic\'s value at a step']], 'i', false));
    var tbody = el('tbody');
    rows.forEach(function (r) {
      var tr = rowStart(r, 'solution');
      var td = el('td');
      r.s.forEach(function (st, t) {
        var line = el('div', 'step');
        line.appendChild(el('span', 'val', fmt(st[q], div)));
        var txt = el('span', 'txt', st[0].replace(/\n+$/, ''));
        txt.style.background = colour(st[q], div);
        if (st[q] === null) txt.classList.add('none');
        if (st[5] === false) txt.classList.add('wrong');
        if (st[5] === false && st[2] !== null && st[2] >= thr) txt.classList.add('missed');
        txt.title = stepTitle(st, t === r.s.length - 1);
        line.appendChild(txt);
        td.appendChild(line);
      });
      tr.appendChild(td);
      var res = el('td');
      res.appendChild(el('span', 'badge ' + (r.ok ? 'ok' : 'bad'), r.ok ? 'correct' : 'incorrect'));
      if (r.fin !== 'eos') res.appendChild(el('div', 'pid', 'cut at ' + r.fin));
      tr.appendChild(res);
      tr.appendChild(el('td', 'num', r.n));
      tr.appendChild(el('td', 'num', D.step_checks ? r.wrong : '\u2014'));
      var m = el('td', 'num');
      if (D.step_checks && r.missed > 0) m.appendChild(el('span', 'badge miss', r.missed));
      else m.textContent = D.step_checks ? '0' : '\u2014';
      tr.appendChild(m);
      tr.appendChild(numCell(r.mindv, true, true));
      tbody.appendChild(tr);
    });
    table.appendChild(tbody);
    return table;
  }

  function stateRows() {
    var rows = D.states.filter(function (r) {
      return matchIt(r) && matchQ(r) && (state.kept !== '1' || r.kept);
    });
    var key = state.sort || 'gap';
    rows.sort(compare(key, state.sort ? state.desc === '1' : true));
    return rows;
  }
  function stateTable(rows) {
    var q = state.colour, div = q !== 'v' && q !== 'mc';
    var table = el('table', 'rows');
    table.id = 'rows';
    table.appendChild(headerRow([['iter', 'i'], ['problem', 'p'], ['state: the steps so far', 'd', false, 'sort: by depth'],
      ['through', 'n', true, 'kept solutions through the state'], ['MC', 'mc', true, 'Monte-Carlo label'],
      ['V', 'v', true, 'the critic\'s value'], ['|V\u2212MC|', 'err', true],
      ['sampled next steps: \u00d7 times, rollouts ending correct, A', null],
      ['gap', 'gap', true, 'max A \u2212 min A over the sampled next steps (kept states only)']], 'gap', true));
    var tbody = el('tbody');
    rows.forEach(function (r) {
      var tr = rowStart(r, 'state');
      var sol = D.solutions[r.sol];
      var pre = [];
      for (var t = 0; t < r.d; t++) pre.push(sol.s[t][0].replace(/\n+$/, ''));
      var td = el('td');
      td.appendChild(el('div', 'pid', 'depth ' + r.d));
      td.appendChild(el('div', 'prefix', r.d ? pre.join('\n') : '(the prompt)'));
      tr.appendChild(td);
      tr.appendChild(el('td', 'num', r.n));
      tr.appendChild(numCell(r.mc, false, true));
      tr.appendChild(numCell(r.v, false, true));
      tr.appendChild(numCell(r.err, false, false));
      var acts = el('td');
      var box = el('div', 'acts');
      r.acts.forEach(function (a) {
        var x = q === 'v' ? a[4] : q === 'mc' ? a[2] : a[5];
        var line = el('div', 'act');
        line.appendChild(el('span', 'val', '\u00d7' + a[1] + ' ' + fmt(a[2]) + ' ' + fmt(a[5], true)));
        var txt = el('span', 'txt', a[0].replace(/\n+$/, '') + (a[3] ? '  [ends]' : ''));
        txt.style.background = colour(x, div);
        if (x === null) txt.classList.add('none');
        if (a[6] === false) txt.classList.add('wrong');
        txt.title = 'sampled ' + a[1] + '\u00d7 \u00b7 rollouts ending correct ' + fmt(a[2]) + ' \u00b7 v(s+a) ' + fmt(a[4]) +
          ' \u00b7 A ' + fmt(a[5], true) + ' \u00b7 task: ' + (a[6] === null ? 'not judged' : a[6] ? 'right' : 'wrong');
        line.appendChild(txt);
        box.appendChild(line);
      });
      acts.appendChild(box);
      tr.appendChild(acts);
      var g = numCell(r.gap, false, false);
      if (!r.kept) g.title = 'not kept: gap below the min gap';
      tr.appendChild(g);
      tbody.appendChild(tr);
    });
    table.appendChild(tbody);
    return table;
  }

  function pager(n, page) {
    status.textContent = '';
    var from = page * PAGE, to = Math.min(n, from + PAGE);
    var total = state.view === 'solutions' ? D.solutions.length : D.states.length;
    var info = el('span', null, n ? (n + ' ' + state.view + ' match (of ' + total + ' in the page); showing ' +
      (from + 1) + '\u2013' + to) : 'no ' + state.view + ' match');
    info.id = 'count';
    info.dataset.matches = String(n);
    status.appendChild(info);
    var prev = el('button', null, '\u2190 previous');
    prev.disabled = page <= 0;
    prev.addEventListener('click', function () { go({page: String(page - 1)}, true); });
    var next = el('button', null, 'next \u2192');
    next.disabled = to >= n;
    next.addEventListener('click', function () { go({page: String(page + 1)}, true); });
    status.appendChild(prev);
    status.appendChild(next);
  }

  function render() {
    Object.keys(tabs).forEach(function (k) { tabs[k].classList.toggle('on', k === state.view); });
    fIt.value = state.it; fColour.value = state.colour; fOutcome.value = state.outcome;
    fMissed.checked = state.missed === '1'; fThr.value = state.thr; fKept.checked = state.kept === '1';
    if (document.activeElement !== fQ) fQ.value = state.q;
    Array.prototype.forEach.call(controls.querySelectorAll('.c-sol'), function (e) { e.classList.toggle('hidden', state.view !== 'solutions'); });
    Array.prototype.forEach.call(controls.querySelectorAll('.c-st'), function (e) { e.classList.toggle('hidden', state.view !== 'states'); });
    Array.prototype.forEach.call(controls.querySelectorAll('.c-rows'), function (e) { e.classList.toggle('hidden', state.view === 'report'); });
    drawLegend();
    main.textContent = '';
    if (state.view === 'report') {
      status.textContent = '';
      main.appendChild(report);
    } else {
      var rows = state.view === 'solutions' ? solutionRows() : stateRows();
      var pages = Math.max(1, Math.ceil(rows.length / PAGE));
      var page = Math.min(parseInt(state.page, 10) || 0, pages - 1);
      pager(rows.length, page);
      var shown = rows.slice(page * PAGE, (page + 1) * PAGE);
      main.appendChild(state.view === 'solutions' ? solutionTable(shown) : stateTable(shown));
    }
    document.body.dataset.ready = '1';
  }

  window.addEventListener('hashchange', function () { readHash(); render(); });
  readHash();
  render();
})();
"""
