// A plotly chart that updates in place: each new figure goes through Plotly.react, which
// redraws only what changed. (st.plotly_chart builds the chart anew whenever its figure
// changes, which made the browser, not training, the limit on a live page's redraw rate.)
//
// Streamlit calls the default export on mount and again with every new `data`:
//   data.figure  the figure as plotly JSON (a string: numpy arrays are already encoded)
//   data.config  plotly's config (modebar, file name of the camera's PNG)
//   data.src     where this app serves plotly.js (Streamlit's static folder)
//   data.summary the chart's text alternative, read by screen readers (ui/charts.py)
//   data.dark    the grid's colour on a dark page (bn_core/figures.py DARK_SCREEN)

const loading = {};

function loadPlotly(src) {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!loading[src]) {
    loading[src] = new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = src;
      script.onload = () => resolve(window.Plotly);
      script.onerror = () => {
        script.remove();
        delete loading[src]; // a later tick may try again
        reject(new Error(`plotly.js did not load from ${src}`));
      };
      document.head.appendChild(script);
    });
  }
  return loading[src];
}

// plotly.js's default font, which the figures keep.
const FONT = '"Open Sans", verdana, arial, sans-serif';
const LINE = 1.3; // line height, in font sizes
const MULTILINE_SHIFT = 0.65; // see fitTitles; measured in Chromium against a one-line title
// The chart's height until plotly.js has drawn it (plotly's own default).
const DEFAULT_HEIGHT = 450;
// Room kept free beside the title for the toolbar (plotly's modebar) until the drawn one
// has been measured: 3 buttons of 24 px in one group (ui/charts.py).
const MODEBAR_GUESS = 80;
const MODEBAR_GAP = 8;
const THEME_POLL_MS = 500;
let measure = null;

function context2d() {
  measure = measure || document.createElement("canvas").getContext("2d");
  return measure;
}

// Any CSS colour as [r, g, b, a], through the canvas's own parser; null if it is not one
// (the canvas then keeps the colour it had, a sentinel here).
function parseColor(text) {
  if (typeof text !== "string") return null;
  const ctx = context2d();
  ctx.fillStyle = "#010203";
  ctx.fillStyle = text;
  const value = ctx.fillStyle;
  if (value === "#010203" && text.trim().toLowerCase() !== "#010203") return null;
  if (value.startsWith("#")) {
    const n = parseInt(value.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255, 1];
  }
  const parts = value.match(/[\d.]+/g).map(Number);
  return [parts[0], parts[1], parts[2], parts.length > 3 ? parts[3] : 1];
}

const css = ([r, g, b, a]) => `rgba(${r},${g},${b},${a})`;

// The app's theme, from the CSS variables Streamlit gives its components. Dark when its
// background is: the OS setting or Streamlit's theme menu, whichever the reader chose.
function appTheme(el) {
  const style = getComputedStyle(el);
  const background = parseColor(style.getPropertyValue("--st-background-color").trim());
  const text = parseColor(style.getPropertyValue("--st-text-color").trim());
  const dark =
    !!background && !!text && background[0] + background[1] + background[2] < 3 * 128;
  return { dark, background, text, key: dark ? `${background}|${text}` : "light" };
}

const COLOR_KEY = /colou?r$/i;
const BACKGROUND_KEY = /bgcolou?r$/i;
const DATA_KEYS = new Set(["x", "y", "z", "text", "customdata", "hovertext", "ids"]);

// A colour of a figure built for a white page, as the dark page shows it. Chromatic colours
// (the variants', the bands') stay. Neutral ones swap ends: white and near-white fills take
// the page's background (keeping their transparency), and dark greys used as ink (labels,
// guide lines, Okabe-Ito's black) turn into the light grey mirrored about the middle, no
// lighter than the page's text.
function darkColor(value, theme, background) {
  const rgba = parseColor(value);
  if (!rgba) return value;
  const [r, g, b, a] = rgba;
  if (Math.max(r, g, b) - Math.min(r, g, b) > 12) return value;
  const level = (r + g + b) / 3;
  if (level >= 200) return css([...theme.background.slice(0, 3), a]);
  if (level < 128 && !background) {
    const ink = theme.text.slice(0, 3).map((c) => Math.min(c, 255 - level));
    return css([...ink, a]);
  }
  return value;
}

function darkenNode(node, theme, key, inFont) {
  if (Array.isArray(node)) {
    return node.map((item) =>
      typeof item === "string" && (COLOR_KEY.test(key) || key === "colorway")
        ? darkColor(item, theme, false)
        : darkenNode(item, theme, key, inFont),
    );
  }
  if (!node || typeof node !== "object") return node;
  for (const [k, v] of Object.entries(node)) {
    if (DATA_KEYS.has(k)) continue;
    if (typeof v === "string" && COLOR_KEY.test(k)) {
      // Text keeps a light colour (it may sit on a coloured mark); fills do not.
      const rgba = parseColor(v);
      const light = rgba && rgba[0] + rgba[1] + rgba[2] >= 3 * 200;
      if (!(inFont && light)) node[k] = darkColor(v, theme, BACKGROUND_KEY.test(k));
    } else if (k === "colorscale" && Array.isArray(v)) {
      node[k] = v.map((stop) =>
        Array.isArray(stop) ? [stop[0], darkColor(stop[1], theme, false)] : stop,
      );
    } else if (v && typeof v === "object") {
      node[k] = darkenNode(v, theme, k, inFont || k === "font" || k.endsWith("font"));
    }
  }
  return node;
}

// Restyle a light screen figure for a dark page: its colours (above), then the page's own
// background and text, and the faint grid of bn_core/figures.py's DARK_SCREEN (colors).
function darken(figure, theme, colors) {
  darkenNode(figure.data, theme, "data", false);
  const layout = darkenNode(figure.layout, theme, "layout", false);
  layout.paper_bgcolor = layout.plot_bgcolor = css(theme.background);
  layout.font = { ...(layout.font || {}), color: css(theme.text) };
  const grid = { gridcolor: colors.grid, zerolinecolor: colors.grid, linecolor: colors.grid };
  for (const [k, axis] of Object.entries(layout)) {
    if (/^[xy]axis\d*$/.test(k) && axis && typeof axis === "object") Object.assign(axis, grid);
  }
  const template = layout.template && layout.template.layout;
  if (template) {
    for (const k of ["xaxis", "yaxis"]) template[k] = { ...(template[k] || {}), ...grid };
  }
  layout.modebar = {
    ...(layout.modebar || {}),
    bgcolor: css([...theme.background.slice(0, 3), 0.5]),
    color: css([...theme.text.slice(0, 3), 0.6]),
    activecolor: css(theme.text),
  };
  return figure;
}

function textWidth(text, size) {
  const ctx = context2d();
  ctx.font = `${size}px ${FONT}`;
  return ctx.measureText(text).width;
}

function wrapWords(text, size, room) {
  if (!text || text.includes("<br>") || textWidth(text, size) <= room) return [text];
  const lines = [];
  let line = "";
  for (const word of text.split(" ")) {
    const longer = line ? `${line} ${word}` : word;
    if (line && textWidth(longer, size) > room) {
      lines.push(line);
      line = word;
    } else {
      line = longer;
    }
  }
  lines.push(line);
  return lines;
}

// Plotly never wraps a title, so on a narrow screen a long one ran off the chart. Break the
// title and subtitle into lines that fit, and grow the top margin and the chart's height
// by the lines added, so the panels keep their size and the legend moves down with them.
// The toolbar sits in the chart's top right corner, level with the title's first line, so
// the title's lines also stop short of the toolbar (`toolbar` pixels wide): it never covers
// them. The subtitle starts below the toolbar and may use the whole width.
function fitTitles(figure, width, toolbar) {
  const layout = figure.layout;
  const title = layout.title;
  if (!title || !title.text || !layout.height || !layout.margin || !width) return figure;
  const left = layout.margin.l || 0; // the title starts at the panels' left
  const room = 0.97 * (width - left);
  const titleRoom = Math.min(room, width - left - toolbar - MODEBAR_GAP);
  const subtitle = title.subtitle || {};
  const titleSize = (title.font && title.font.size) || 16;
  const subtitleSize = (subtitle.font && subtitle.font.size) || 12;
  const titleLines = wrapWords(title.text, titleSize, titleRoom);
  const subtitleLines = wrapWords(subtitle.text, subtitleSize, room);
  const extra = Math.ceil(
    LINE * (titleSize * (titleLines.length - 1) + subtitleSize * (subtitleLines.length - 1)),
  );
  if (extra === 0) return figure;
  const before = layout.height;
  layout.height = before + extra;
  layout.margin.t = (layout.margin.t || 0) + extra;
  title.text = titleLines.join("<br>");
  if (subtitle.text) subtitle.text = subtitleLines.join("<br>");
  if (title.yref === "container" && typeof title.y === "number") {
    // Plotly drops the top anchor's shift (about 0.7 em) from a title of several lines,
    // so its first line would start above the chart's edge: move it down by that much.
    const down = titleLines.length > 1 ? MULTILINE_SHIFT * titleSize : 0;
    title.y = 1 - ((1 - title.y) * before + down) / layout.height;
  }
  const legend = layout.legend;
  if (legend && legend.yref === "container" && typeof legend.y === "number") {
    legend.y = 1 - ((1 - legend.y) * before + extra) / layout.height;
  }
  return figure;
}

// The toolbar's width as drawn, for fitTitles (0 for a chart without one).
function toolbarWidth(gd) {
  const bar = gd.querySelector(".modebar");
  return bar ? Math.ceil(bar.getBoundingClientRect().width) : 0;
}

async function drawLatest(gd) {
  // Ticks can arrive faster than a slow browser draws: draw only the newest figure.
  gd.__busy = true;
  try {
    const Plotly = await loadPlotly(gd.__src);
    let rewrapped = false;
    while (gd.__pending) {
      gd.__pending = false;
      const width = gd.clientWidth;
      const theme = appTheme(gd);
      let figure = JSON.parse(gd.__figure);
      if (theme.dark) figure = darken(figure, theme, gd.__dark);
      const toolbarUsed = gd.__toolbar ?? MODEBAR_GUESS;
      figure = fitTitles(figure, width, toolbarUsed);
      figure.layout.autosize = true;
      delete figure.layout.width;
      gd.style.minHeight = `${figure.layout.height || DEFAULT_HEIGHT}px`;
      await Plotly.react(gd, figure.data, figure.layout, gd.__config);
      gd.__drawnWidth = width;
      gd.__themeKey = theme.key;
      // The toolbar is for the mouse; the keyboard's way to the same files is the page's
      // export panel. As tab stops, its buttons sat between every chart and the controls.
      for (const button of gd.querySelectorAll(".modebar-btn")) button.tabIndex = -1;
      gd.__toolbar = toolbarWidth(gd);
      // Titles wrapped for a toolbar of another width than drawn: once more, around it.
      if (gd.__toolbar !== toolbarUsed && !rewrapped) {
        rewrapped = gd.__pending = true;
      }
      gd.dataset.draws = Number(gd.dataset.draws || 0) + 1; // read by the browser tests
    }
    gd.__message.textContent = "";
  } catch (err) {
    // Said next to the chart, whose own elements plotly.js must find intact next time.
    gd.__message.textContent = `This chart could not be drawn: ${err.message}`;
  } finally {
    gd.__busy = false;
  }
}

function redraw(gd) {
  gd.__pending = true;
  if (!gd.__busy) drawLatest(gd);
}

// A reader may switch between light and dark (the OS setting, or Streamlit's theme menu)
// while no new figure comes, so the charts on screen check the theme now and then.
const charts = new Set();
let themeTimer = null;

function watchTheme(gd) {
  charts.add(gd);
  if (themeTimer) return;
  themeTimer = setInterval(() => {
    for (const chart of charts) {
      if (!chart.isConnected) charts.delete(chart);
      else if (chart.__themeKey && appTheme(chart).key !== chart.__themeKey) redraw(chart);
    }
    if (!charts.size) {
      clearInterval(themeTimer);
      themeTimer = null;
    }
  }, THEME_POLL_MS);
}

export default function ({ parentElement, data }) {
  let gd = parentElement.querySelector(".bnlab-chart");
  if (!gd) {
    gd = document.createElement("div");
    gd.className = "bnlab-chart";
    gd.style.width = "100%";
    // A screen reader reads the chart as one picture, named by its title and its numbers
    // now (data.summary); plotly's SVG inside it says nothing useful on its own.
    gd.setAttribute("role", "img");
    gd.__message = document.createElement("p");
    gd.__message.className = "bnlab-chart-error";
    gd.__message.style.margin = "0"; // no room taken while there is nothing to say
    parentElement.append(gd.__message, gd);
    // Streamlit's sidebar and columns change a chart's width without a window resize, and a
    // new width may need the title wrapped differently.
    gd.__resize = new ResizeObserver(() => {
      if (gd.__figure && gd.clientWidth !== gd.__drawnWidth) redraw(gd);
    });
    gd.__resize.observe(gd);
  }
  watchTheme(gd);
  gd.__figure = data.figure;
  gd.__config = { responsive: true, ...data.config };
  gd.__src = data.src;
  gd.__dark = data.dark;
  if (data.summary) gd.setAttribute("aria-label", data.summary);
  if (!gd.__drawnWidth) {
    // Hold the chart's height before plotly.js arrives, so the page does not jump.
    gd.style.minHeight = `${JSON.parse(data.figure).layout.height || DEFAULT_HEIGHT}px`;
  }
  redraw(gd);
  return () => {
    // Called when the chart leaves the page; a chart that is only redrawn stays connected.
    setTimeout(() => {
      if (gd.isConnected) return;
      gd.__resize.disconnect();
      charts.delete(gd);
      if (window.Plotly) window.Plotly.purge(gd);
    }, 0);
  };
}
