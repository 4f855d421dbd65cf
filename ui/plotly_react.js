// A plotly chart that updates in place: each new figure goes through Plotly.react, which
// redraws only what changed. (st.plotly_chart builds the chart anew whenever its figure
// changes, which made the browser, not training, the limit on a live page's redraw rate.)
//
// Streamlit calls the default export on mount and again with every new `data`:
//   data.figure  the figure as plotly JSON (a string: numpy arrays are already encoded)
//   data.config  plotly's config (modebar, file name of the camera's PNG)
//   data.src     where this app serves plotly.js (Streamlit's static folder)

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
let measure = null;

function textWidth(text, size) {
  measure = measure || document.createElement("canvas").getContext("2d");
  measure.font = `${size}px ${FONT}`;
  return measure.measureText(text).width;
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
function fitTitles(figure, width) {
  const layout = figure.layout;
  const title = layout.title;
  if (!title || !title.text || !layout.height || !layout.margin || !width) return figure;
  const room = 0.97 * (width - (layout.margin.l || 0)); // the title starts at the panels' left
  const subtitle = title.subtitle || {};
  const titleSize = (title.font && title.font.size) || 16;
  const subtitleSize = (subtitle.font && subtitle.font.size) || 12;
  const titleLines = wrapWords(title.text, titleSize, room);
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

async function drawLatest(gd) {
  // Ticks can arrive faster than a slow browser draws: draw only the newest figure.
  gd.__busy = true;
  try {
    const Plotly = await loadPlotly(gd.__src);
    while (gd.__pending) {
      gd.__pending = false;
      const width = gd.clientWidth;
      const figure = fitTitles(JSON.parse(gd.__figure), width);
      figure.layout.autosize = true;
      delete figure.layout.width;
      gd.style.minHeight = `${figure.layout.height || DEFAULT_HEIGHT}px`;
      await Plotly.react(gd, figure.data, figure.layout, gd.__config);
      gd.__drawnWidth = width;
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

export default function ({ parentElement, data }) {
  let gd = parentElement.querySelector(".bnlab-chart");
  if (!gd) {
    gd = document.createElement("div");
    gd.className = "bnlab-chart";
    gd.style.width = "100%";
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
  gd.__figure = data.figure;
  gd.__config = { responsive: true, ...data.config };
  gd.__src = data.src;
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
      if (window.Plotly) window.Plotly.purge(gd);
    }, 0);
  };
}
